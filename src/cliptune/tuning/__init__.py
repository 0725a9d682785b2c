"""What trains and how: locking, LoRA, layer-wise lr decay, EMA, WiSE-FT; `strategies` applies them to a model."""

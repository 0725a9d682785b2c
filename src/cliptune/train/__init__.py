"""Training: setting a run up (`setup.build_trainer`), the loop (`loop.fit`), checkpoints, optimizer and schedule,
distributed helpers, logging and the run's final report. Lower packages (models, data, losses, tuning, eval) never
import this one."""

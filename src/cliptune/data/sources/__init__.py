"""Build real image-caption tables offline from installed data packages: one module per source.

These machines reach only package registries, so the real data we can demo and benchmark on comes from Debian/npm
packages (see `scripts/install_data_packages.sh`):

- Open Clip Art Library (`openclipart-png` + `openclipart-svg`): clip art whose SVG metadata gives a title, keywords
  and sometimes a description; the top-level folder is a category usable as a zero-shot class.
- Noto Color Emoji (`fonts-noto-color-emoji`) rendered with Pillow, captioned from `emojibase-data` labels and tags.

Both builders write the same layout into `out_dir`:

    images/...           RGB PNGs, `image_size` px on the longest side, composited on white
    train.csv, val.csv   columns `image` (path relative to out_dir) and `caption` (a JSON list of strings)
    val_classes.txt      `path<TAB>label` lines for the val images (class names may contain spaces)
    manifest.json        build parameters and counts; a rebuild with the same parameters is skipped

Train and val are split by image *group* (one title, or one emoji without its gender/skin variants) and stratified by
label, so no held-out image, and no near-copy of one, is ever seen in training. What the builders share (items,
images on white, the split, tables, the manifest) is `common`; `python -m cliptune.data.sources` runs `cli.main`.
"""

from cliptune.data.sources.cli import main
from cliptune.data.sources.common import DataPackageMissingError
from cliptune.data.sources.emoji import DEFAULT_EMOJI_FONT, build_emoji
from cliptune.data.sources.openclipart import build_openclipart

__all__ = ["DEFAULT_EMOJI_FONT", "DataPackageMissingError", "build_emoji", "build_openclipart", "main"]

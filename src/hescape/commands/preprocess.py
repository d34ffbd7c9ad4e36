"""Build the training shards of a curated panel: decoded uint8 patches at training resolution
(cropped in µm), raw counts and train-only gene statistics, memory-mappable per split."""

from __future__ import annotations

from hescape.commands._params import add_params_arguments

NAME = "preprocess"
HELP = "decode and crop patches into memory-mappable training shards"


def add_arguments(parser):
    parser.add_argument("--panel", required=True, help="curated panel directory")
    add_params_arguments(parser, example="preprocess.image_size=96")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the shards exist")


def run(args) -> int:
    from hescape.config import apply_overrides, load_params, section
    from hescape.data.shards import PreprocessConfig, Shards, build_shards

    params = apply_overrides(load_params(args.params), args.overrides)
    cfg = section(params, "preprocess", PreprocessConfig)
    root = build_shards(args.panel, cfg, overwrite=args.overwrite)
    shards = Shards(root)
    sizes = ", ".join(f"{k} {v}" for k, v in shards.manifest["sizes"].items())
    print(f"shards {root}  ({sizes}; {shards.image_size} px, {len(shards.genes)} genes)")
    return 0

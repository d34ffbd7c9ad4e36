"""The ``--params`` / ``--set`` arguments that every parameterised step shares."""

from __future__ import annotations


def add_params_arguments(parser, example: str) -> None:
    """Add ``--params FILE`` and repeatable ``--set KEY=VALUE`` (``example`` shows one override)."""
    parser.add_argument("--params", default=None, help="params.yaml (default: ./params.yaml if present)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a parameter, e.g. {example} (repeatable)")

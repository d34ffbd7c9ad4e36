"""The seven HESCAPE panels as configuration data (``panels.yaml`` beside this module)."""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from hescape.errors import DataError, UnknownNameError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PanelSpec:
    """One panel of the benchmark.

    Attributes
    ----------
    name
        Config name, e.g. ``human-breast-panel`` (also the Hugging Face config name).
    n_genes
        Length of every ``gexp`` vector of this panel.
    splits
        ``{"train": [...], "val": [...], "test": [...]}`` sample ids.
    filter_column, filter_values
        Records kept when importing (the reference configs keep ``source == "hest"`` or a tissue).
    patients
        ``sample id -> (study, patient)`` where the split tables name a patient.
    """

    name: str
    n_genes: int
    splits: dict[str, list[str]]
    filter_column: str | None = None
    filter_values: tuple[str, ...] = ()
    patients: dict[str, tuple[str, str]] = field(default_factory=dict)

    def split_of(self) -> dict[str, str]:
        """``sample id -> split``. A sample listed in two splits keeps the later one
        (the skin panel uses its single held-out sample for both val and test)."""
        return {sid: split for split in SPLITS for sid in self.splits.get(split, [])}

    def donor_of(self, sample_id: str) -> str:
        """Donor id of a sample: ``patient [study]`` when known, else the sample id itself."""
        if sample_id in self.patients:
            study, patient = self.patients[sample_id]
            return f"{patient} [{study}]"
        return sample_id


@functools.cache
def _load() -> dict[str, PanelSpec]:
    raw = yaml.safe_load(resources.files("hescape.data").joinpath("panels.yaml").read_text())
    specs = {}
    for name, entry in raw["panels"].items():
        filt = entry.get("filter") or {}
        specs[name] = PanelSpec(
            name=name,
            n_genes=int(entry["n_genes"]),
            splits={s: [str(x) for x in entry["splits"].get(s, [])] for s in SPLITS},
            filter_column=filt.get("column"),
            filter_values=tuple(str(v) for v in filt.get("values", [])),
            patients={k: (v[0], v[1]) for k, v in (entry.get("patients") or {}).items()},
        )
    return specs


def panel_names() -> list[str]:
    """Names of the known panels."""
    return list(_load())


def get_panel_spec(name: str) -> PanelSpec:
    """The :class:`PanelSpec` of ``name``; unknown names fail with the known ones."""
    specs = _load()
    if name not in specs:
        raise UnknownNameError("panel", name, specs)
    return specs[name]


def read_gene_file(path: str | Path) -> tuple[list[str], list[str] | None]:
    """Read a gene list: a TSV with a ``symbol`` column (optionally ``ensembl_id``), or one symbol
    per line. Returns ``(symbols, ensembl_ids or None)``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"cannot read gene list: {exc}", file=path) from exc
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError("gene list is empty", file=path)
    header = lines[0].split("\t")
    if "symbol" in header:
        rows = list(csv.DictReader(lines, delimiter="\t"))
        symbols = [r["symbol"].strip() for r in rows]
        ensembl = [r.get("ensembl_id", "").strip() for r in rows] if "ensembl_id" in header else None
    else:
        symbols, ensembl = [ln.split("\t")[0].strip() for ln in lines], None
    for i, sym in enumerate(symbols):
        if not sym:
            raise DataError("empty gene symbol", file=path, record=i, field="symbol")
    if len(set(symbols)) != len(symbols):
        dup = sorted({s for s in symbols if symbols.count(s) > 1})[:5]
        raise DataError(f"duplicate gene symbols: {dup}", file=path, field="symbol")
    return symbols, ensembl


def read_split_tables(directory: str | Path) -> dict[str, dict[str, dict[str, str]]]:
    """Read ``{train,val,test}.csv`` split tables (HESCAPE layout: ``id``, ``patient``, ``organ``,
    ``pixel_size_um_estimated``, ...). Returns ``split -> sample id -> row``."""
    directory = Path(directory)
    tables = {}
    for split in SPLITS:
        path = directory / f"{split}.csv"
        if not path.exists():
            raise DataError(f"missing split table {split}.csv", file=directory)
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for i, row in enumerate(rows):
            if not row.get("id"):
                raise DataError("missing sample id", file=path, record=i, field="id")
        tables[split] = {row["id"]: row for row in rows}
    return tables

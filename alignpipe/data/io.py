"""Reading and validating stage inputs at the boundary. Every message is one line naming the path, the
column, the expected and found type, and the command that produces the expected kind."""
from __future__ import annotations

from pathlib import Path

from alignpipe.core.errors import UserError, first_line
from alignpipe.data.manifest import read_manifest


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 10**6


def _parts(path: Path) -> list[Path] | None:
    """The part folders of a multi-process output (part-I-of-N), or None; refuses an incomplete set."""
    parts = sorted(path.glob("part-*-of-*")) if path.is_dir() else []
    if not parts:
        return None
    total = int(parts[0].name.rsplit("-", 1)[1])
    done = [p for p in parts if (p / "manifest.json").exists()]
    if len(done) != total:
        have = {int(p.name.split("-")[1]) for p in done}
        missing = [i for i in range(total) if i not in have]
        raise UserError(f"{path}: incomplete multi-process output: parts {missing} of {total} are missing")
    return done


def _no_data_files(path: Path) -> bool:
    import json

    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError):
        return False


def _load(path: Path):
    from datasets import concatenate_datasets, load_from_disk

    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    parts = _parts(path)
    if parts:
        return concatenate_datasets([_load(p) for p in parts])
    if not path.is_dir() or not ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        raise UserError(f"{path}: not a dataset folder (no dataset_info.json/state.json); "
                        f"bring outside data in with `alignpipe import`")
    if _no_data_files(path):
        raise UserError(f"{path}: the dataset is empty (0 rows)")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # corrupted arrow, bad json, ...
        raise UserError(f"{path}: cannot read the dataset ({first_line(e, 160)})")
    if not hasattr(ds, "features"):
        raise UserError(f"{path}: is a DatasetDict; pass one split folder, e.g. {path}/train")
    return ds


def kind_of(path: Path) -> tuple[str | None, str | None]:
    """(kind, schema version) recorded in a dataset's manifest, or (None, None)."""
    parts = sorted(Path(path).glob("part-*-of-*")) if Path(path).is_dir() else []
    m = read_manifest(parts[0] if parts else path) or {}
    schema = m.get("schema") or {}
    return schema.get("kind"), schema.get("version")


def _type_str(feature) -> str:
    from datasets import Value

    if isinstance(feature, Value):
        return feature.dtype
    if hasattr(feature, "feature"):  # List, LargeList, Sequence
        return f"list<{_type_str(feature.feature)}>"
    if isinstance(feature, list):
        return f"list<{_type_str(feature[0])}>" if feature else "list"
    if isinstance(feature, dict):
        return "{" + ", ".join(f"{k}: {_type_str(v)}" for k, v in feature.items()) + "}"
    return type(feature).__name__


def check_columns(ds, kind: str, where: str) -> None:
    """Raise UserError naming the first missing or mistyped column of `ds` against the schema of `kind`."""
    from alignpipe import schemas

    expected = schemas.features(kind)
    for col in schemas.columns(kind):
        if col.name not in ds.features:
            raise UserError(f"{where}: missing column '{col.name}' (expected {schemas.type_name(col.dtype)}; "
                            f"{kind} datasets are written by `{schemas.producer(kind)}`)")
        want, found = _type_str(expected[col.name]), _type_str(ds.features[col.name])
        if want != found:
            raise UserError(f"{where}: column '{col.name}' has type {found}, expected {want} "
                            f"({kind} datasets are written by `{schemas.producer(kind)}`)")


def read_input(path: Path | str, kinds: str | tuple[str, ...], stage: str, allow_empty: bool = False):
    """Load a dataset written by alignpipe, check its kind, version and columns; return (dataset, kind)."""
    from alignpipe import schemas

    path = Path(path)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    ds = _load(path)
    kind, version = kind_of(path)
    if kind is None:
        raise UserError(f"{path}: no alignpipe manifest, so its kind is unknown; `{stage}` needs "
                        f"{' or '.join(kinds)} (bring outside data in with `alignpipe import`)")
    if kind not in kinds:
        producers = ", ".join(f"{k} from `{schemas.producer(k)}`" for k in kinds)
        raise UserError(f"{path}: is a '{kind}' dataset; `{stage}` needs {producers}")
    if _major(version) > _major(schemas.SCHEMA_VERSION):
        raise UserError(f"{path}: schema version {version} is newer than this alignpipe's "
                        f"{schemas.SCHEMA_VERSION}; upgrade alignpipe")
    if len(ds) == 0 and not allow_empty:
        raise UserError(f"{path}: the dataset is empty (0 rows); `{stage}` needs at least one row")
    check_columns(ds, kind, str(path))
    return ds, kind


def conform(ds, kind: str):
    """Select and order the schema's columns and cast to its exact features (what every stage writes)."""
    from alignpipe import schemas

    names = [c.name for c in schemas.columns(kind)]
    missing = [n for n in names if n not in ds.column_names]
    if missing:
        raise RuntimeError(f"internal: stage output lacks columns {missing} of kind {kind}")
    ds = ds.select_columns(names)
    if ds.features == schemas.features(kind):
        return ds
    # in memory: a cast of rows read from an input would otherwise write a cache-*.arrow file into that input
    return ds.cast(schemas.features(kind), keep_in_memory=True)


def dataset_from_rows(rows: list[dict], features=None, *, fingerprint: str | None = None):
    """An in-memory Dataset of `rows` (with `features`, else types inferred), fingerprinted from the rows' JSON.

    `Dataset.from_list` / `from_dict` leave the fingerprint to `datasets`, which pickles the whole Arrow table
    with dill to hash it: a copy of the data, and an error wherever dill cannot pickle a pyarrow object (seen
    with pyarrow 26 on Python 3.12: "Can't pickle <class 'MonthDayNano'>"). Here nothing is pickled.
    """
    import hashlib
    import json

    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable

    keys = list(features) if features is not None else list(dict.fromkeys(k for r in rows for k in r))
    columns = {k: [r.get(k) for r in rows] for k in keys}
    if features is not None:
        table = InMemoryTable.from_pydict(features.encode_batch(columns), schema=features.arrow_schema)
    else:
        table = InMemoryTable.from_pydict(columns)
    if fingerprint is None:
        text = json.dumps([keys, columns], sort_keys=True, default=str, ensure_ascii=False)
        fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Dataset(table, info=DatasetInfo(features=features), fingerprint=fingerprint)

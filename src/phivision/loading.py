"""Strict weight loading: a checkpoint's tensors must be exactly the model's, or loading stops with one line.

transformers and PEFT load a checkpoint with a missing tensor by initialising it randomly (a warning in a log),
so a truncated or foreign checkpoint would train or answer on random weights with exit code 0. Every loader
of phivision (the base model in ``train`` and :func:`phivision.runs.load_model`, LoRA adapters, ``--resume``)
goes through these checks instead. The only tolerated difference is listed in :data:`TOLERATED_EXTRA`.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import PretrainedConfig
from transformers.utils import logging

from phivision.errors import PhivisionError, first_line
from phivision.model.modeling_phi3_v import Phi3VForCausalLM

MODEL_TYPE = "phi3_v"

# Tensors a checkpoint may hold that the model does not have. Only one: some tools save the token embedding a
# second time as ``model.vision_embed_tokens.wte.weight`` (the official remote code registers the embedding
# under the vision module too); it duplicates ``model.embed_tokens.weight`` and is dropped.
TOLERATED_EXTRA = (re.compile(r"model\.vision_embed_tokens\.wte\.weight"),)


def _names(keys: Iterable[str], limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def describe_mismatch(
    missing: Iterable[str],
    unexpected: Iterable[str],
    misshaped: Mapping[str, tuple[Any, Any]],
) -> str | None:
    """``missing 2 tensors (a, b); unexpected 1 (c); mis-shaped 1 (d: checkpoint [3, 3], model [4, 4])`` or
    None when everything matches. ``misshaped`` maps a name to (checkpoint shape, model shape)."""
    missing = list(missing)
    unexpected = [k for k in unexpected if not any(p.fullmatch(k) for p in TOLERATED_EXTRA)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) ({_names(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensor(s) ({_names(unexpected)})")
    if misshaped:
        shown = [f"{k}: checkpoint {list(a)}, model {list(b)}" for k, (a, b) in sorted(misshaped.items())[:3]]
        more = f" and {len(misshaped) - 3} more" if len(misshaped) > 3 else ""
        parts.append(f"mis-shaped {len(misshaped)} tensor(s) ({'; '.join(shown)}{more})")
    return "; ".join(parts) or None


def check_tensors(source: str | Path, expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> None:
    """Raise one line naming the tensors when ``found`` (name -> shape in the file) differs from ``expected``."""
    misshaped = {
        k: (found[k], expected[k])
        for k in expected.keys() & found.keys()
        if tuple(found[k]) != tuple(expected[k])
    }
    problem = describe_mismatch(expected.keys() - found.keys(), found.keys() - expected.keys(), misshaped)
    if problem:
        raise PhivisionError(f"{source}: does not match the model: {problem}")


def check_model_type(name: str) -> None:
    """The checkpoint's config.json must declare ``model_type: phi3_v``; anything else is another model."""
    try:
        config, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError) as err:
        raise PhivisionError(f"cannot load checkpoint {name!r}: {first_line(err)}") from None
    found = config.get("model_type")
    if found != MODEL_TYPE:
        raise PhivisionError(
            f"{name}: config.json has model_type {found!r}, not {MODEL_TYPE!r} (Phi-3-Vision); "
            "phivision fine-tunes Phi-3-Vision checkpoints only"
        )


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers prints a multi-line load report (PEFT a warning) for any difference; we raise one line."""
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about missing adapter keys; check_adapter names them
            yield
    finally:
        logging.set_verbosity(level)


def load_pretrained(name: str, **kwargs: Any) -> Any:
    """``Phi3VForCausalLM.from_pretrained(name, **kwargs)``, refusing another ``model_type`` and any missing,
    unexpected (beyond :data:`TOLERATED_EXTRA`) or mis-shaped tensor with one line naming them."""
    check_model_type(name)
    try:
        with _quiet_load_report():
            model, info = Phi3VForCausalLM.from_pretrained(
                name, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except (OSError, ValueError) as err:
        raise PhivisionError(f"cannot load checkpoint {name!r}: {first_line(err)}") from None
    misshaped = {}
    for item in info.get("mismatched_keys") or ():
        if isinstance(item, (tuple, list)) and len(item) == 3:
            misshaped[item[0]] = (tuple(item[1]), tuple(item[2]))
        else:
            misshaped[str(item)] = ((), ())
    problem = describe_mismatch(info.get("missing_keys") or (), info.get("unexpected_keys") or (), misshaped)
    if problem:
        raise PhivisionError(f"{name}: the checkpoint does not match Phi-3-Vision: {problem}")
    # The checkpoint's auto_map names code of its own (the hub's remote code, or anyone's). phivision runs its own
    # classes, and what it saves from this model (RUN/model, checkpoints) must not send a trust_remote_code
    # reader to that code; exports get phivision's own auto_map (phivision.model.save_checkpoint).
    if hasattr(model.config, "auto_map"):
        del model.config.auto_map
    return model


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple]:
    """Tensor name -> shape of a PEFT adapter's safetensors files, read from their headers only."""
    files = sorted(adapter_dir.glob("*.safetensors"))
    if not files:
        raise PhivisionError(f"{adapter_dir}: no adapter_model.safetensors")
    shapes: dict[str, tuple] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # noqa: BLE001  (SafetensorError is not an OSError)
            raise PhivisionError(f"{file}: not a readable safetensors file ({err})") from None
    return shapes


def check_adapter(model: Any, adapter_dir: Path) -> None:
    """The adapter files must hold exactly the LoRA tensors ``model`` (a PeftModel) expects, shapes included."""
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    check_tensors(adapter_dir, expected, adapter_shapes(adapter_dir))


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+?): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)


def load_adapter(base: Any, adapter_dir: Path, is_trainable: bool = False) -> Any:
    """``PeftModel.from_pretrained`` with the tensors checked: PEFT itself only warns about missing ones."""
    adapter_dir = Path(adapter_dir)
    adapter_shapes(adapter_dir)  # readable safetensors, before PEFT builds anything
    try:
        with _quiet_load_report():
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    except RuntimeError as err:  # torch's size-mismatch report: name the tensors on one line
        shapes = {m.group(1): (m.group(2), m.group(3)) for m in _SIZE_MISMATCH.finditer(str(err))}
        if not shapes:
            raise PhivisionError(f"{adapter_dir}: cannot load the PEFT adapter: {first_line(err)}") from None
        misshaped = {k: (_shape(a), _shape(b)) for k, (a, b) in shapes.items()}
        raise PhivisionError(
            f"{adapter_dir}: does not match the model: {describe_mismatch((), (), misshaped)}"
        ) from None
    except (OSError, ValueError, TypeError) as err:
        raise PhivisionError(f"{adapter_dir}: cannot load the PEFT adapter: {first_line(err)}") from None
    check_adapter(model, adapter_dir)
    return model


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())

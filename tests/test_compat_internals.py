"""Megatron-Core internals this project depends on: still there, and the list complete.

Fails loudly (naming the internal and who uses it) when an upgrade of megatron-core
(or torch) moved a private name, a name cpu_compat rebinds, or a versioned API; and
when the package starts using a private Megatron name that mcore_compat does not list.
"""
import re
from pathlib import Path

import pytest
import torch

from megatron_upcycle import mcore_compat

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "megatron_upcycle"


def test_every_listed_internal_is_present_in_the_installed_versions():
    missing = mcore_compat.missing_internals()
    assert not missing, "Megatron-Core/torch internals moved:\n" + "\n".join(missing)


def test_each_listed_internal_is_really_used_where_it_says():
    for internal in mcore_compat.ALL_CHECKED:
        source = (REPO / internal.used_by).read_text()
        assert internal.attribute.split(".")[-1] in source or internal.attribute.split(".")[0] in source, \
            internal.name


def _megatron_imports(text: str) -> dict[str, str]:
    """local name -> the megatron.core object it was imported as."""
    aliases = {}
    imports = re.findall(r"from (megatron\.core[\w.]*) import (?:\(([^)]*)\)|([^\n(]*))", text)
    for module, bracketed, plain in imports:
        for item in (bracketed or plain).split("#")[0].split(","):
            parts = item.split()
            if parts:
                aliases[parts[-1]] = f"{module}.{parts[0]}"
    return aliases


def _private_megatron_names() -> set[str]:
    """module.name for every underscore name of megatron.core the package imports or touches
    (``alias._name``, ``getattr(alias, "_name")``; aliases pooled over the package, since a
    module object can be handed from one file to another, as mcore_compat does)."""
    texts = [path.read_text() for path in PACKAGE.rglob("*.py")]
    aliases = {}
    for text in texts:
        aliases.update(_megatron_imports(text))
    found = {target for target in aliases.values() if target.rsplit(".", 1)[1].startswith("_")}
    for text in texts:
        for local, target in aliases.items():
            pattern = rf"\b{re.escape(local)}\.(_[A-Za-z]\w*)|attr\({re.escape(local)}, \"(_[A-Za-z]\w*)\""
            for dotted, quoted in re.findall(pattern, text):
                found.add(f"{target}.{dotted or quoted}")
    return found


def test_the_list_of_private_megatron_internals_is_complete():
    used = _private_megatron_names()
    listed = {i.name for i in mcore_compat.PRIVATE_INTERNALS}
    unlisted = sorted(used - listed)
    assert not unlisted, f"private Megatron internals used but not listed in mcore_compat: {unlisted}"
    assert listed <= used, f"listed but no longer used (drop them): {sorted(listed - used)}"


def test_the_source_checker_agrees_with_the_installed_package(tmp_path):
    site = Path(torch.__file__).parents[1]
    checked = mcore_compat.check_source_tree(str(site), mcore_compat.PRIVATE_INTERNALS + mcore_compat.PATCH_POINTS)
    assert all(checked.values()), [k for k, ok in checked.items() if not ok]
    fake = tmp_path / "megatron" / "core" / "datasets"
    fake.mkdir(parents=True)
    (fake / "indexed_dataset.py").write_text("class IndexReader:\n    pass\n")  # renamed upstream
    checked = mcore_compat.check_source_tree(str(tmp_path), mcore_compat.PRIVATE_INTERNALS)
    assert checked["megatron.core.datasets.indexed_dataset._IndexReader"] is False


def test_moe_metrics_tracker_paths(megatron_cpu):
    """reset / zero / read the aux-loss tracker through the version-independent functions."""
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.config import ModelConfig, MoEConfig
    from megatron_upcycle.models import build_gpt_model

    model_cfg = ModelConfig(name="compat-2L", num_layers=2, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=64, vocab_size=128, seq_length=16)
    gpt = build_gpt_model(model_cfg, MoEConfig(4, 2), select_backend(force_cpu=True))
    assert mcore_compat.moe_metric_values("load_balancing_loss") is None  # a new model: empty tracker
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    gpt(tokens, torch.arange(16).expand(2, 16), None, labels=tokens).mean().backward()
    values = mcore_compat.moe_metric_values("load_balancing_loss")
    assert values is not None and values.shape == (2,) and bool((values > 0).all())
    mcore_compat.zero_moe_metrics()
    assert not mcore_compat.moe_metric_values("load_balancing_loss").any()
    mcore_compat.reset_moe_metrics()
    assert mcore_compat.moe_metric_values("load_balancing_loss") is None


def test_setup_pins_match_the_stated_version_range():
    setup = (REPO / "setup.py").read_text()
    doc = (REPO / "docs" / "megatron-versions.md").read_text()
    for marker, spec in mcore_compat.SUPPORTED.items():
        line = f'"megatron-core{spec}; {marker}"'
        assert line in setup, line
        assert f"`megatron-core{spec}; {marker}`" in doc
    assert f"megatron-core {mcore_compat.TESTED}" in doc


@pytest.mark.parametrize("internal", mcore_compat.PRIVATE_INTERNALS, ids=lambda i: i.attribute)
def test_private_internals_are_documented(internal):
    assert internal.name in (REPO / "docs" / "megatron-versions.md").read_text()
    assert internal.name in mcore_compat.__doc__

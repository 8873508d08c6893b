"""The docs cannot drift from the code: the configuration reference is the generator's output, every
schema key has a description, every command line in the guides composes, the error messages quoted
in troubleshooting.md are the ones the code raises, and every relative link resolves."""

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

from k2train import confdoc
from k2train.config import JobConfig, load_config

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
REGENERATE = "python -m k2train.confdoc > docs/configuration.md"


def schema_keys(cls: type = JobConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += schema_keys(t, f"{prefix}{f.name}.")
            continue
        keys.append(prefix + f.name)
        args = typing.get_args(t)
        if typing.get_origin(t) is list and args and dataclasses.is_dataclass(args[0]):
            keys += schema_keys(args[0], f"{prefix}{f.name}[].")
    return keys


def test_configuration_md_is_generated_from_the_schema():
    committed = (DOCS / "configuration.md").read_text()
    assert committed == confdoc.render(), f"docs/configuration.md is stale: run `{REGENERATE}`"


def test_every_key_is_listed_with_a_description():
    text = confdoc.render()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \|.*\| ([^|]*) \|$", text, re.M)}
    keys = schema_keys()
    missing = [k for k in keys if k not in rows]
    assert not missing, f"keys absent from the reference: {missing}"
    undocumented = [k for k in keys if not rows[k].strip()]
    assert not undocumented, (
        f"keys without a description: {undocumented}; add a comment above the field in k2train/config.py "
        "(or an entry in k2train.confdoc.NOTES)"
    )
    stale = sorted(set(confdoc.NOTES) - set(keys))
    assert not stale, f"k2train.confdoc.NOTES describes keys the schema no longer has: {stale}"


def test_field_comments_are_read_from_the_source():
    notes = confdoc.field_comments(type(load_config().trainer))
    assert notes["spike_window"].startswith("... its running mean over this many recent")
    assert confdoc.type_name(typing.Optional[str]) == "str \\| None"
    assert confdoc.type_name(typing.Literal["a", "b"]) == '"a" \\| "b"'


def _command_lines(md: Path) -> list[str]:
    """Lines of ```bash blocks that launch the trainer (continuations joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", md.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if "k2train.train" in line or re.search(r"launch/\w+\.(sh|sbatch)\b", line):
                out.append(line)
    return out


def _overrides(line: str) -> list[str]:
    words = shlex.split(line)
    # after the entry point / script (and cpu.sh's process count)
    start = next(i for i, w in enumerate(words) if w in ("k2train.train",) or re.search(r"launch/\w+\.(sh|sbatch)$", w))
    ovr = []
    for w in words[start + 1 :]:
        if "=" not in w or w.startswith("-"):
            continue
        key, value = w.split("=", 1)
        if "," in value and "[" not in value:  # a -m sweep: compose its first value
            value = value.split(",")[0]
        ovr.append(f"{key}={value}")
    return ovr


GUIDES = ["quickstart.md", "troubleshooting.md", "index.md"]
LINES = [(g, l) for g in GUIDES for l in _command_lines(DOCS / g)] + [("README", l) for l in _command_lines(REPO / "README.md")]


@pytest.mark.parametrize("where, line", LINES, ids=[f"{w}:{i}" for i, (w, _) in enumerate(LINES)])
def test_documented_command_lines_compose(where, line):
    cfg = load_config(_overrides(line))
    if "--cfg" not in line:
        cfg.validate()


def test_there_are_command_lines_to_check():
    assert len([1 for w, _ in LINES if w == "quickstart.md"]) >= 10


def test_troubleshooting_quotes_the_real_messages():
    text = (DOCS / "troubleshooting.md").read_text()
    for overrides in (["optim.lr=-3"], ["model.attn_impl=cudnn"], ["model.num_experts_per_tok=32"], ["trainer.seq_len=8192"]):
        with pytest.raises(ValueError) as e:
            load_config(overrides).validate()
        assert f"`{e.value}`" in text, f"troubleshooting.md lacks the current message: {e.value}"
    from k2train.parallel import ParallelDims

    for overrides, world in ((["parallel=ep4"], 2), (["parallel=ep4", "model.n_routed_experts=18"], 4),
                             (["parallel=dp2", "trainer.micro_batch_size=8"], 2)):
        cfg = load_config(overrides)
        with pytest.raises(ValueError) as e:
            ParallelDims.from_config(cfg.parallel, world).validate(cfg.model, cfg.trainer)
        assert f"`{e.value}`" in text, f"troubleshooting.md lacks the current message: {e.value}"


def test_relative_links_resolve():
    for md in [DOCS / g for g in GUIDES] + [DOCS / "configuration.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.name} links to missing {target}"


def test_index_links_every_guide():
    index = (DOCS / "index.md").read_text()
    unlisted = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and f"]({p.name})" not in index]
    assert not unlisted, f"docs/index.md does not link {unlisted}"


def test_nothing_cites_files_outside_the_repository():
    """Users have only this repository: no doc, module or script points at planning files outside it."""
    root = DOCS.parent
    files = [root / "README.md", *DOCS.glob("*.md")]
    for folder in ("k2train", "optim", "kernels", "data_pipeline", "scripts", "launch", "conf"):
        files += [p for p in (root / folder).rglob("*") if p.suffix in (".py", ".md", ".sh", ".yaml", ".sbatch")]
    pattern = re.compile(r"DESIGN\.md|BASELINES\.md|STYLE\.md|\.\./shared/")
    bad = [str(p.relative_to(root)) for p in files if pattern.search(p.read_text(errors="replace"))]
    assert not bad, f"these cite files that are not in the repository: {bad}"

"""Typed config: ``defaults:`` inheritance, dotted overrides, and errors that name the field."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pop_nemo.config import Config, ConfigError, apply_overrides, load_config, load_yaml
from pop_nemo.selfplay.roles import TASKS

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_no_file_gives_the_dataclass_defaults():
    assert load_config() == Config()


def test_child_overrides_parent_through_relative_defaults(tmp_path):
    write(
        tmp_path / "shared" / "parent.yaml",
        "task: creative_writing\nseed: 7\nrollout:\n  n: 6\n  docs_per_step: 3\n"
        "  solver: {temperature: 0.5, max_new_tokens: 99}\n",
    )
    # the child lives in another folder: its defaults path is relative to the child file, not the cwd
    child = write(
        tmp_path / "runs" / "child.yaml",
        "defaults: [../shared/parent.yaml]\nseed: 8\nrollout:\n  n: 3\n  solver: {temperature: 0.9}\n",
    )
    cfg = load_config(child)
    assert cfg.task == "creative_writing"  # from the parent
    assert cfg.seed == 8  # child wins
    assert cfg.rollout.n == 3
    assert cfg.rollout.docs_per_step == 3  # sibling key of an overridden one survives the merge
    assert cfg.rollout.solver.temperature == 0.9
    assert cfg.rollout.solver.max_new_tokens == 99  # nested merge, not replacement
    assert cfg.rollout.judge == Config().rollout.judge  # untouched by either file: dataclass default


def test_later_defaults_win_and_a_string_default_is_allowed(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\noutput_dir: from_a\n")
    write(tmp_path / "b.yaml", "seed: 2\n")
    assert load_yaml(write(tmp_path / "c.yaml", "defaults: [a.yaml, b.yaml]\n")) == {"seed": 2, "output_dir": "from_a"}
    assert load_yaml(write(tmp_path / "d.yaml", "defaults: a.yaml\n")) == {"seed": 1, "output_dir": "from_a"}


def test_dotted_overrides_are_typed_as_yaml(tmp_path):
    cfg = load_config(
        None,
        [
            "trainer.max_steps=10",
            "policy.lr=1e-5",  # no dot: PyYAML alone would read a string
            "algo.kl_coef=0",  # an integer where a float is declared
            "logging.tensorboard=false",
            "corpus.max_documents=null",
            "corpus.domains=[health, web]",
            "policy.betas=[0.8, 0.95]",
            "task=creative_writing",
            "rollout.solver.temperature=0.3",
            "output_dir=",
        ],
    )
    assert cfg.trainer.max_steps == 10 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.policy.lr == 1e-5 and isinstance(cfg.policy.lr, float)
    assert cfg.algo.kl_coef == 0.0 and isinstance(cfg.algo.kl_coef, float)
    assert cfg.logging.tensorboard is False
    assert cfg.corpus.max_documents is None
    assert cfg.corpus.domains == ["health", "web"]
    assert cfg.policy.betas == [0.8, 0.95]
    assert cfg.task == "creative_writing"
    assert cfg.rollout.solver.temperature == 0.3
    assert cfg.output_dir == ""


def test_override_wins_over_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "trainer: {max_steps: 3, save_every: 2}\n")
    cfg = load_config(path, ["trainer.max_steps=5"])
    assert (cfg.trainer.max_steps, cfg.trainer.save_every) == (5, 2)


def test_apply_overrides_does_not_mutate_its_input():
    data = {"trainer": {"max_steps": 3}}
    assert apply_overrides(data, ["trainer.max_steps=4"]) == {"trainer": {"max_steps": 4}}
    assert data == {"trainer": {"max_steps": 3}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_step=3"], "unknown config field 'trainer.max_step'; did you mean 'max_steps'?"),
        (["rollout.zzz=3"], "unknown config field 'rollout.zzz'; known fields: .*docs_per_step"),
        (["trainer.max_steps=abc"], "trainer.max_steps must be an integer, got 'abc'"),
        (["trainer.max_steps=2.5"], "trainer.max_steps must be an integer, got 2.5"),
        (["trainer.max_steps=true"], "trainer.max_steps must be an integer, got True"),
        (["policy.lr=fast"], "policy.lr must be a number, got 'fast'"),
        (["logging.tensorboard=yes please"], "logging.tensorboard must be true or false"),
        (["corpus.domains=health"], "corpus.domains must be a list, got 'health'"),
        (["algo.advantage=ppo"], "algo.advantage='ppo' is not allowed; use one of 'grpo', 'rloo'"),
        (["roles.judge=critic"], "roles.judge='critic' is not allowed; use one of 'policy', 'reference'"),
        (["rollout.n=1"], "rollout.n=1: a group needs at least 2 answers"),
        (["offline.n=1"], r"^offline.n=1: pairs need at least 2 answers per problem; set offline.n>=2$"),
        (["task=chess"], "task='chess' is unknown; use one of creative_writing, health_care, instruction_following"),
        (["rollout.judge.top_p=0"], r"rollout.judge.top_p must be in \(0, 1\]"),
        (["algo.clip_eps=1.5"], r"algo.clip_eps must be in \[0, 1\)"),
        (["rollout=3"], "rollout must be a mapping, got 3"),
        (["trainer.max_steps"], "override 'trainer.max_steps' must look like field.path=value"),
    ],
)
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_field_in_a_file_names_its_dotted_path(tmp_path):
    path = write(tmp_path / "c.yaml", "algo:\n  kl_coeff: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config field 'algo.kl_coeff'; did you mean 'kl_coef'?"):
        load_config(path)


def test_override_below_a_scalar_is_an_error(tmp_path):
    path = write(tmp_path / "c.yaml", "trainer: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match="'max_steps' is not a section"):
        load_config(path, ["trainer.max_steps.x=1"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path / "c.yaml", "defaults: [missing_parent.yaml]\n")
    with pytest.raises(ConfigError, match="missing_parent.yaml' does not exist"):
        load_config(path)


def test_self_including_defaults_are_an_error(tmp_path):
    path = write(tmp_path / "self.yaml", "defaults: [self.yaml]\nseed: 1\n")
    with pytest.raises(ConfigError, match="self.yaml includes itself"):
        load_config(path)
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [./a.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_diamond_defaults_are_not_a_cycle(tmp_path):
    write(tmp_path / "base.yaml", "seed: 5\n")
    write(tmp_path / "x.yaml", "defaults: [base.yaml]\noutput_dir: x\n")
    write(tmp_path / "y.yaml", "defaults: [base.yaml]\ntask: creative_writing\n")
    cfg = load_config(write(tmp_path / "top.yaml", "defaults: [x.yaml, y.yaml]\n"))
    assert (cfg.seed, cfg.output_dir, cfg.task) == (5, "x", "creative_writing")


def test_bad_yaml_and_non_mapping_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "seed: [1, 2\n"))
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()


def leaves(data: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out: dict[tuple[str, ...], object] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(leaves(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def chain(path: Path) -> list[dict]:
    """The raw YAML of ``path`` and its ancestors through ``defaults``, nearest first (read here,
    independently of load_yaml)."""
    raw = yaml.safe_load(path.read_text()) or {}
    parents = raw.pop("defaults", []) or []
    parents = [parents] if isinstance(parents, str) else parents
    out = [raw]
    for parent in reversed(parents):
        out += chain(path.parent / parent)
    return out


def assert_inherits(path: Path) -> Config:
    """Every leaf a file sets holds in the loaded config, unless a nearer file sets it too."""
    cfg = load_config(path)
    files = chain(path)
    assert len(files) >= 2, f"{path} should inherit through defaults"
    seen: set[tuple[str, ...]] = set()
    for raw in files:
        for key, value in leaves(raw).items():
            if key in seen:
                continue
            seen.add(key)
            got = cfg
            for part in key:
                got = getattr(got, part)
            assert got == value, (path.name, ".".join(key), got, value)
    return cfg


def test_smoke_cpu_config_loads_through_base():
    cfg = assert_inherits(ROOT / "conf" / "smoke_cpu.yaml")
    assert cfg.policy.lr == 1e-5  # written 1.0e-5
    assert cfg.rollout.rubric.temperature == 0.0  # set only in base.yaml


def test_tiny_test_config_inherits_two_levels():
    files = chain(ROOT / "tests" / "conf" / "tiny.yaml")
    assert len(files) == 3  # tiny -> smoke_cpu -> base
    assert_inherits(ROOT / "tests" / "conf" / "tiny.yaml")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "tasks").glob("*.yaml")))
def test_task_configs_load(name):
    cfg = assert_inherits(ROOT / "conf" / "tasks" / f"{name}.yaml")
    assert cfg.task == name and name in TASKS
    assert cfg.corpus.source != "mini"  # each task names its paper corpus


def test_every_task_has_a_config():
    assert {p.stem for p in (ROOT / "conf" / "tasks").glob("*.yaml")} == set(TASKS)


def test_resume_guard_holds_what_resume_must_not_change():
    from pop_nemo.checkpoint import resume_guard

    base = resume_guard(load_config())
    assert resume_guard(load_config(None, ["trainer.max_steps=50", "output_dir=elsewhere"])) == base
    for change in ("algo.kl_coef=0.5", "rollout.n=8", "seed=1", "task=creative_writing", "corpus.min_words=10"):
        assert resume_guard(load_config(None, [change])) != base, change


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_steps=0"], r"^trainer.max_steps must be >= 1, got 0$"),
        (["policy.lr=-1"], r"^policy.lr must be >= 0 \(0 = no update: a control run\), got -1$"),
        (["eval.confidence=1.0"], r"^eval.confidence must be in \[0.5, 1\) \(e.g. 0.95\), got 1.0$"),
        (["rollout.trtllm.kv_cache_fraction=1"], r"^rollout.trtllm.kv_cache_fraction must be in \(0, 1\), got 1$"),
        (["corpus.domains=[health, 3]"], r"^corpus.domains\[1\] must be a string, got 3$"),
        (["critic.url=3"], r"^critic.url must be a string, got 3$"),
        (["sead=1"], r"^unknown config field 'sead'; did you mean 'seed'\?$"),
        (["offline.teacher.urll=x"], r"^unknown config field 'offline.teacher.urll'; did you mean 'url'\?$"),
        (["dpo.batch_size=3", "dpo.micro_batch_size=2"], r"^dpo.batch_size=3 must be a multiple of dpo"),
    ],
)
def test_bounds_and_nested_errors_are_one_line_with_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_written_config_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(ROOT / "tests" / "conf" / "tiny.yaml", ["critic.url=[http://a:1, http://b:2]"])
    again = load_config(write(tmp_path / "dumped.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_build_section_checks_a_plain_dataclass_the_same_way():
    from dataclasses import dataclass

    from pop_nemo.config import build_section

    @dataclass
    class Serve:
        port: int = 1
        max_wait_ms: float = 10.0
        engine: Literal["hf", "trtllm"] = "hf"

    got = build_section(Serve, {"port": 9, "max_wait_ms": "1e-3"}, "serve")
    assert got == Serve(9, 0.001, "hf") and type(got) is Serve
    with pytest.raises(ConfigError, match=r"^unknown config field 'serve.prot'; did you mean 'port'\?$"):
        build_section(Serve, {"prot": 1}, "serve")
    with pytest.raises(ConfigError, match=r"^serve.engine='openai' is not allowed; use one of 'hf', 'trtllm'$"):
        build_section(Serve, {"engine": "openai"}, "serve")
    with pytest.raises(ConfigError, match=r"^serve must be a mapping, got 3$"):
        build_section(Serve, 3, "serve")


def test_guide_section_makes_the_guide_limits_field_for_field():
    from pop_nemo.config import GuideConfig
    from pop_nemo.selfplay.roles import GuideLimits

    # Each bound's default is the config's alone: the domain object declares none but max_weight.
    assert [f.name for f in fields(GuideLimits) if f.default is not MISSING] == ["max_weight"]
    names = [k for k in GuideConfig.model_fields if k not in ("enabled", "max_criteria")]
    section = GuideConfig(max_criteria=3, **{k: 11 + i for i, k in enumerate(names)})
    lim = GuideLimits.from_section(section)
    assert lim.max_criteria == 3 and [getattr(lim, k) for k in names] == [11 + i for i in range(len(names))]
    assert lim.max_weight == next(f.default for f in fields(GuideLimits) if f.name == "max_weight")  # not a setting


def test_offline_section_makes_the_pair_filter_field_for_field():
    from pop_nemo.rl.pairs import PairFilter

    assert all(f.default is MISSING for f in fields(PairFilter))  # each default is the config's alone
    off = load_config(
        None,
        [
            "offline.best_of_n=5",
            "offline.std_threshold=0.5",
            "offline.max_length_diff_words=7",
            "offline.length_words=whitespace",
            "offline.shuffle_seed=3",
            "offline.max_pairs=9",
        ],
    ).offline
    assert PairFilter.from_config(off) == PairFilter(5, 0.5, 7, "whitespace", 3, 9)

"""Findings as data: the YAML specs in `experiments/findings/`, read and checked.

A finding (`findings/fNN_*.yaml`) names a claim, the recipe its arms start from, the arms (a name
and config overrides each), and what it expects as testable statements over a metric:

    expect:
      - {metric: fid, claim: ordering, arms: [d6, d4, d2]}                       # d6 > d4 > d2
      - {metric: fid, claim: equivalent, arms: [a, b], relative_margin: 0.15}     # |a - b| < 15% of b
      - {metric: fid, claim: noninferior, arms: ["flow@0.5", ddpm], relative_margin: 0.1}

`arm@f` is the arm evaluated at fraction f of its budget (default: the end). An override is a
config field (`model.depth`), a sampling setting (`sample.cfg_scale`: arms that differ only there
share one trained model), or a tokenizer setting (`tokenizer.kind`, `tokenizer.token_dim`: the
arm first trains that tokenizer, then its DiT on the tokens). `suite.yaml` holds the recipes and
the profiles (smoke | cpu | gpu): budget, seeds, shared config and the evaluation protocol.

Optional keys: `seed_arms: [a, b]` (also per profile, `profiles.<p>.seed_arms`) runs only those
arms with every seed and the others with one; `points: [0.25, 0.5, 1.0]` replaces the profile's
evaluated fractions of the budget (the budget is then rounded up so that each is a whole step and a
checkpoint); `profiles.<p>.budget` (`{epochs: e}` or `{steps: n}`) and `profiles.<p>.points` replace
the profile's budget and points for this finding alone (a study compared at matched compute keeps
its short budget; committed results keep their points when the profile's change);
`analysis: scaling` (or `{kind: scaling, claims: [...]}`) takes the verdicts from
`scaling_study` (power-law fits, compute-matched comparisons), and `expect` may then be empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from ditlab.codecs.tokenizers import TOKENIZER_KINDS
from ditlab.config import Config, config_from_dict, validate
from ditlab.errors import DitlabError
from ditlab.experiments.stats import CLAIMS
from ditlab.models import build_model

FINDINGS_DIR = Path(str(resources.files("ditlab") / "experiments" / "findings"))
PROFILES = ("smoke", "cpu", "gpu")
# metric -> higher is better
METRICS = {"acc": True, "fid": False, "psnr": True, "bpb": False}
TOKENIZER_KEYS = ("kind", "token_dim", "hidden")
SAMPLERS = {"gaussian": "ddim", "flow": "euler", "shortcut": "shortcut"}  # the fixed sampler per objective
# analysis kind -> (its claims, the claims a plain `analysis: <kind>` judges); see experiments/scaling_study.py
ANALYSES = {"scaling": (("power_law", "patch_vs_params", "compute_efficiency", "unet_vs_dit"),
                        ("power_law", "patch_vs_params", "compute_efficiency"))}


@dataclass
class Expectation:
    metric: str
    claim: str
    arms: list[str]  # names, each optionally "name@fraction"
    margin: float | None = None
    relative_margin: float | None = None
    profiles: list[str] | None = None  # None: every profile

    def arm_points(self) -> list[tuple[str, float]]:
        return [split_point(a) for a in self.arms]


@dataclass
class Profile:
    name: str
    seeds: int
    budget: dict[str, float]  # {"epochs": e} or {"steps": n}
    config: dict[str, Any]
    recipe_config: dict[str, dict[str, Any]]  # recipe -> overrides in this profile
    recipe_budget: dict[str, dict[str, float]]  # recipe -> its own budget in this profile
    tokenizer: dict[str, int]  # steps, batch_size
    eval: dict[str, Any]  # samples, reference, points, cfg_scale, steps {objective: n}, lm_bytes, inception[_reference]

    def budget_for(self, recipe: str) -> dict[str, float]:
        return self.recipe_budget.get(recipe, self.budget)


@dataclass
class Finding:
    id: str
    title: str
    claim: str
    source: str
    recipe: str
    arms: dict[str, dict[str, Any]]
    expect: list[Expectation]
    note: str = ""
    verdict: str = "all"  # all: every expectation must hold | any: the claim holds for some reading
    budget_scale: float = 1.0
    profile_arms: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    profile_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None
    analysis: str | None = None  # "scaling": verdicts from `experiments.scaling_study` (expect may then be empty)
    analysis_claims: list[str] = field(default_factory=list)  # the analysis' parts that decide the verdict
    seed_arms: list[str] | None = None  # arms run with every seed, the others with one (None: every arm)
    profile_seed_arms: dict[str, list[str]] = field(default_factory=dict)  # seed_arms per profile
    points: list[float] | None = None  # evaluated fractions of the budget (None: the profile's)
    profile_budget: dict[str, dict[str, float]] = field(default_factory=dict)  # budget per profile (else the profile's)
    profile_points: dict[str, list[float]] = field(default_factory=dict)  # points per profile (else `points`)

    def arms_for(self, profile: str) -> dict[str, dict[str, Any]]:
        return {**self.arms, **self.profile_arms.get(profile, {})}

    def seeds_for(self, arm: str, profile: str, seeds: int) -> int:
        """Seeds of an arm: all for a seed arm (or when the finding names none), else one."""
        chosen = self.profile_seed_arms.get(profile, self.seed_arms)
        return seeds if chosen is None or arm in chosen else min(seeds, 1)

    def budget_for(self, profile: Profile) -> dict[str, float]:
        return self.profile_budget.get(profile.name) or profile.budget_for(self.recipe)

    def points_for(self, profile: Profile) -> list[float]:
        return self.profile_points.get(profile.name) or self.points or list(profile.eval["points"])

    def expectations_for(self, profile: str) -> list[Expectation]:
        return [e for e in self.expect if e.profiles is None or profile in e.profiles]


def split_point(name: str) -> tuple[str, float]:
    """"arm@0.5" -> ("arm", 0.5); "arm" -> ("arm", 1.0)."""
    if "@" not in name:
        return name, 1.0
    arm, _, frac = name.partition("@")
    try:
        f = float(frac)
    except ValueError:
        raise DitlabError(f"'{name}': the part after @ must be a fraction of the budget") from None
    return arm, f


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DitlabError(f"cannot read finding spec {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DitlabError(f"finding spec {path} must be a mapping")
    return data


def _budget(data: Any, where: str) -> dict[str, float]:
    """{"epochs": e} or {"steps": n}, positive."""
    if not (isinstance(data, dict) and len(data) == 1 and set(data) <= {"epochs", "steps"}
            and isinstance(next(iter(data.values())), (int, float)) and next(iter(data.values())) > 0):
        raise DitlabError(f"{where}: budget must be {{epochs: e}} or {{steps: n}} with a positive number, got {data}")
    return {k: float(v) for k, v in data.items()}


def _points(data: Any, where: str) -> list[float]:
    """Evaluated fractions of the budget, sorted, each in (0, 1]."""
    if not (isinstance(data, list) and data and all(isinstance(f, (int, float)) and 0 < f <= 1 for f in data)):
        raise DitlabError(f"{where}: points must be a list of fractions of the budget in (0, 1], got {data}")
    return sorted({float(f) for f in data})


def _only(data: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise DitlabError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(allowed)})")


def load_suite(findings_dir: Path | None = None) -> tuple[dict[str, dict], dict[str, Profile]]:
    """(recipes, profiles) of suite.yaml in findings_dir, else the packaged one."""
    path = (findings_dir or FINDINGS_DIR) / "suite.yaml"
    if not path.is_file():
        path = FINDINGS_DIR / "suite.yaml"
    data = _read(path)
    _only(data, ("recipes", "profiles"), str(path))
    profiles = {}
    for name, p in data["profiles"].items():
        _only(p, ("seeds", "budget", "config", "recipes", "recipe_budget", "tokenizer", "eval"), f"{path}: profile {name}")
        _only(p["eval"], ("samples", "reference", "points", "cfg_scale", "steps", "lm_bytes", "inception", "inception_reference"),
              f"{path}: profile {name}: eval")
        profiles[name] = Profile(name, int(p["seeds"]), _budget(p["budget"], f"{path}: profile {name}"), dict(p.get("config") or {}),
                                 {k: dict(v) for k, v in (p.get("recipes") or {}).items()},
                                 {k: dict(v) for k, v in (p.get("recipe_budget") or {}).items()},
                                 dict(p.get("tokenizer") or {}), dict(p["eval"]))
    return dict(data["recipes"]), profiles


def parse_finding(data: dict, path: Path | None = None) -> Finding:
    where = f"finding spec {path}" if path else "finding spec"
    _only(data, ("id", "title", "claim", "source", "recipe", "arms", "expect", "note", "verdict", "budget_scale",
                 "profiles", "analysis", "seed_arms", "points"), where)
    analysis, claims = data.get("analysis"), None
    if isinstance(analysis, dict):  # {kind: scaling, claims: [...]}; a plain name takes its default claims
        _only(analysis, ("kind", "claims"), f"{where}: analysis")
        analysis, claims = analysis.get("kind"), analysis.get("claims")
    if analysis is not None:
        if not isinstance(analysis, str) or analysis not in ANALYSES:
            raise DitlabError(f"{where}: unknown analysis '{analysis}' (known: {', '.join(ANALYSES)})")
        known, default = ANALYSES[analysis]
        claims = list(default) if claims is None else claims
        if not isinstance(claims, list) or not claims or any(c not in known for c in claims):
            raise DitlabError(f"{where}: analysis claims must be some of {', '.join(known)}, got {claims}")
    required = ("id", "title", "claim", "source", "recipe", "arms") + (() if analysis else ("expect",))
    missing = [k for k in required if k not in data]
    if missing:
        raise DitlabError(f"{where}: missing {', '.join(missing)}")
    if not data.get("expect") and not analysis:
        raise DitlabError(f"{where}: no expectations (only a finding with an `analysis` may state none)")
    points = None if data.get("points") is None else _points(data["points"], where)
    expect = []
    for e in data.get("expect") or []:
        _only(e, ("metric", "claim", "arms", "margin", "relative_margin", "profiles"), f"{where}: expect")
        expect.append(Expectation(e["metric"], e["claim"], [str(a) for a in e["arms"]], e.get("margin"),
                                  e.get("relative_margin"), e.get("profiles")))
    profile_arms, profile_config, profile_seed_arms, profile_budget, profile_points = {}, {}, {}, {}, {}
    for name, p in (data.get("profiles") or {}).items():
        _only(p, ("arms", "config", "seed_arms", "budget", "points"), f"{where}: profiles.{name}")
        if p.get("budget") is not None:
            profile_budget[name] = _budget(p["budget"], f"{where}: profiles.{name}")
        if p.get("points") is not None:
            profile_points[name] = _points(p["points"], f"{where}: profiles.{name}")
        profile_arms[name] = {str(k): dict(v or {}) for k, v in (p.get("arms") or {}).items()}
        profile_config[name] = dict(p.get("config") or {})
        if p.get("seed_arms") is not None:
            profile_seed_arms[name] = [str(a) for a in p["seed_arms"]]
    seed_arms = data.get("seed_arms")
    return Finding(str(data["id"]), data["title"], data["claim"], data["source"], data["recipe"],
                   {str(k): dict(v or {}) for k, v in data["arms"].items()}, expect, data.get("note", ""),
                   data.get("verdict", "all"), float(data.get("budget_scale", 1.0)), profile_arms, profile_config, path,
                   analysis=analysis, analysis_claims=claims or [], profile_seed_arms=profile_seed_arms,
                   seed_arms=None if seed_arms is None else [str(a) for a in seed_arms],
                   points=points, profile_budget=profile_budget, profile_points=profile_points)


def load_findings(findings_dir: Path | None = None) -> dict[str, Finding]:
    """Every finding spec, by id, in file order."""
    folder = findings_dir or FINDINGS_DIR
    if not folder.is_dir():
        raise DitlabError(f"findings folder not found: {folder}")
    found: dict[str, Finding] = {}
    for path in sorted(folder.glob("f*.yaml")):
        f = parse_finding(_read(path), path)
        if f.id in found:
            raise DitlabError(f"finding id {f.id} is used by {found[f.id].path} and {path}")
        found[f.id] = f
    return found


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.depth": 2} -> {"model": {"depth": 2}}."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def split_tokenizer(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config overrides, tokenizer settings) of an arm."""
    tok = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("tokenizer.")}
    return {k: v for k, v in overrides.items() if not k.startswith("tokenizer.")}, tok


def arm_config(finding: Finding, arm: str, profile: Profile, recipes: dict[str, dict]) -> tuple[Config, dict[str, Any]]:
    """The validated config of an arm in a profile (budget, seed and paths not yet set), and its
    tokenizer settings ({} for none)."""
    overrides, tok = split_tokenizer(finding.arms_for(profile.name)[arm])
    flat = {**recipes[finding.recipe], **profile.config, **profile.recipe_config.get(finding.recipe, {}),
            **finding.profile_config.get(profile.name, {}), **overrides}
    where = f"finding {finding.id}, arm {arm}"
    try:
        cfg = config_from_dict(nest(flat))
        if tok:
            _only(tok, TOKENIZER_KEYS, f"{where}: tokenizer")
            kind = tok.get("kind")
            if kind not in TOKENIZER_KINDS or tok.get("token_dim") not in TOKENIZER_KINDS[kind][1]:
                raise DitlabError(f"tokenizer {kind} with token_dim {tok.get('token_dim')} is not offered "
                                  f"(kinds: {', '.join(f'{k} {v[1]}' for k, v in TOKENIZER_KINDS.items())})")
            down = TOKENIZER_KINDS[kind][0]
            cfg.model.in_channels, cfg.model.input_size = int(tok["token_dim"]), cfg.data.image_size // down
        return validate(cfg), tok
    except DitlabError as e:
        raise DitlabError(f"{where}: {e}") from None


def check_finding(finding: Finding, recipes: dict[str, dict], profiles: dict[str, Profile]) -> None:
    """Every arm builds a valid config in every profile; every expectation names real arms and metrics."""
    if finding.recipe not in recipes:
        raise DitlabError(f"finding {finding.id}: unknown recipe '{finding.recipe}' (known: {', '.join(recipes)})")
    if finding.verdict not in ("all", "any"):
        raise DitlabError(f"finding {finding.id}: verdict must be 'all' or 'any', not '{finding.verdict}'")
    if not finding.budget_scale > 0:
        raise DitlabError(f"finding {finding.id}: budget_scale must be positive")
    for name in {**finding.profile_arms, **finding.profile_seed_arms, **finding.profile_budget, **finding.profile_points}:
        if name not in profiles:
            raise DitlabError(f"finding {finding.id}: unknown profile '{name}'")
    every_arm = {a for p in profiles for a in finding.arms_for(p)}
    for arm in (finding.seed_arms or []) + [a for arms in finding.profile_seed_arms.values() for a in arms]:
        if arm not in every_arm:
            raise DitlabError(f"finding {finding.id}: seed_arms names '{arm}', which is no arm of any profile")
    for profile in profiles.values():
        for arm in finding.arms_for(profile.name):
            cfg, _ = arm_config(finding, arm, profile, recipes)
            try:  # the model's own checks (e.g. a U-Net given DiT sizes), without allocating it
                with torch.device("meta"):
                    build_model(cfg)
            except DitlabError as e:
                raise DitlabError(f"finding {finding.id}, arm {arm}, profile {profile.name}: {e}") from None
    for e in finding.expect:
        where = f"finding {finding.id}: expectation {e.claim} {e.arms}"
        if e.metric not in METRICS:
            raise DitlabError(f"{where}: unknown metric '{e.metric}' (known: {', '.join(METRICS)})")
        if e.claim not in CLAIMS:
            raise DitlabError(f"{where}: unknown claim '{e.claim}' (known: {', '.join(CLAIMS)})")
        if e.claim in ("equivalent", "noninferior") and (e.margin is None) == (e.relative_margin is None):
            raise DitlabError(f"{where}: give exactly one of margin and relative_margin")
        for name in e.profiles or []:
            if name not in profiles:
                raise DitlabError(f"{where}: unknown profile '{name}'")
        for profile in profiles.values():
            if e.profiles is not None and profile.name not in e.profiles:
                continue
            arms = finding.arms_for(profile.name)
            for arm, frac in e.arm_points():
                if arm not in arms:
                    raise DitlabError(f"{where}: no arm '{arm}' in profile {profile.name}")
                if not any(math.isclose(frac, p) for p in finding.points_for(profile)):
                    raise DitlabError(f"{where}: {frac} is not an evaluated point of profile {profile.name} "
                                      f"({finding.points_for(profile)})")
                if e.metric == "psnr" and not split_tokenizer(arms[arm])[1]:
                    raise DitlabError(f"{where}: psnr needs arms that train a tokenizer; '{arm}' does not")


def select(findings: dict[str, Finding], ids: list[str]) -> list[Finding]:
    """The findings named by ids (all when empty); an unknown id is an error."""
    unknown = [i for i in ids if i not in findings]
    if unknown:
        raise DitlabError(f"unknown finding id(s) {', '.join(unknown)} (known: {', '.join(findings)})")
    return [findings[i] for i in ids] if ids else list(findings.values())

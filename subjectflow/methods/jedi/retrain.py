"""When the joint model retrains (`joint.retrain`): one model serves every subject and
personalises a new one by set completion without training on it, so a new photo need not
retrain it. Retraining on every change made one new photo at 1,000 subjects cost 568 s
against 64 s at 100: every subject's JeDi evaluation went stale with the model.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from ...catalog import Catalog
from ...catalog.schemas import MODELS
from ...config import JointConfig

SetMembers = dict[str, str]  # set_id -> subject_id


def retrain_due(policy: JointConfig, trained: SetMembers, now: SetMembers, age_days: float) -> str | None:
    """Why the sets `now` call for a new model over one trained on `trained`, or None to keep it."""
    changed = len(set(trained) ^ set(now))
    if not changed:
        return None
    if policy.retrain == "any":
        return f"{changed} joint set(s) changed (joint.retrain any)"
    if policy.retrain == "schedule":
        return (f"{changed} joint set(s) changed and the model is {age_days:.1f} days old (joint.retrain_days "
                f"{policy.retrain_days:g})") if age_days >= policy.retrain_days else None
    share = changed / len(set(trained) | set(now))
    return (f"{share:.0%} of the joint sets changed (joint.retrain_fraction {policy.retrain_fraction:g})"
            if share >= policy.retrain_fraction else None)


def trained_sets(catalog: Catalog, row: dict) -> SetMembers | None:
    """The sets a model row trained on; None for a model recorded before they were kept."""
    if not row.get("sets_file"):
        return None
    return json.loads(catalog.blob_path(row["sets_file"]).read_text())


def kept_model(catalog: Catalog, policy: JointConfig, method: str, params: dict, now: SetMembers) -> dict | None:
    """The newest model of `method` trained with `params` that the policy keeps for the sets `now`."""
    same = [r for r in catalog.read(MODELS.name).to_pylist()
            if r["method"] == method and _training_params(r) == params]
    if not same:
        return None
    newest = max(same, key=lambda r: r["created_at"])
    trained = trained_sets(catalog, newest)
    if trained is None:
        return None
    age_days = (datetime.now(timezone.utc) - newest["created_at"]).total_seconds() / 86400
    return newest if retrain_due(policy, trained, now, age_days) is None else None


def _training_params(row: dict) -> dict:
    params = json.loads(row["params"])
    params.pop("retrain", None)  # the policy it was kept under, recorded beside its identity
    return params

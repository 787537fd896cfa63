"""Sanity checks for the bundled sample data in data/ (stdlib + json only)."""

import filecmp
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")

CAI_FIELDS = [
    "init_prompt", "init_response", "critic_prompt", "critic_response",
    "revision_prompt", "revision_response", "prompt", "principle", "area",
]
MESSAGE_FIELDS = ["messages", "chosen", "rejected"]
HELPFUL_FIELDS = ["prompt", "completion", "category"]
EXPECTED_AREAS = {
    "violence", "weapons", "self_harm", "hate", "harassment", "privacy_doxxing",
    "fraud_scams", "cybercrime", "drugs", "theft_burglary", "child_safety",
    "dangerous_medical", "extremism", "manipulation",
}


def norm(text):
    return re.sub(r"\s+", " ", text.strip().lower())


def load_jsonl(name):
    path = os.path.join(DATA, name)
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            assert line.strip(), f"{name}:{i} is blank"
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def constitution():
    with open(os.path.join(DATA, "constitution.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cai():
    return {"train": load_jsonl("cai_train.jsonl"), "test": load_jsonl("cai_test.jsonl")}


@pytest.fixture(scope="module")
def helpful():
    return {"train": load_jsonl("helpful_train.jsonl"), "test": load_jsonl("helpful_test.jsonl")}


@pytest.fixture(scope="module")
def redteam_prompts():
    return load_jsonl("redteam_prompts.jsonl")


# ----------------------------------------------------------------- constitution
def test_constitution_structure(constitution):
    assert isinstance(constitution, list)
    assert len(constitution) >= 12
    ids = [p["id"] for p in constitution]
    assert len(ids) == len(set(ids)), "duplicate principle ids"
    for p in constitution:
        for key in ("id", "name", "critique_request", "revision_request"):
            assert isinstance(p.get(key), str) and p[key].strip(), (p.get("id"), key)
        assert re.fullmatch(r"P\d{2}", p["id"]), p["id"]
        assert p["critique_request"].startswith("Identify specific ways"), p["id"]
        assert p["revision_request"].startswith("Please rewrite the assistant response"), p["id"]


def test_constitution_has_helpfulness_principle(constitution):
    assert any("helpful" in p["name"].lower() for p in constitution)


# ----------------------------------------------------------------- red-team rows
def test_cai_counts(cai):
    assert len(cai["train"]) >= 500
    assert len(cai["test"]) >= 120
    for split in ("train", "test"):
        areas = {r["area"] for r in cai[split]}
        assert len(areas) >= 12, (split, areas)


def test_cai_covers_expected_areas_evenly(cai):
    for split in ("train", "test"):
        counts = {}
        for r in cai[split]:
            counts[r["area"]] = counts.get(r["area"], 0) + 1
        assert EXPECTED_AREAS <= set(counts), (split, EXPECTED_AREAS - set(counts))
        assert max(counts.values()) <= 2 * min(counts.values()), (split, counts)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cai_schema_and_consistency(cai, constitution, split):
    by_id = {p["id"]: p for p in constitution}
    for i, r in enumerate(cai[split]):
        where = f"cai_{split}.jsonl row {i}"
        for key in CAI_FIELDS:
            assert isinstance(r.get(key), str) and r[key].strip(), (where, key)
        for key in MESSAGE_FIELDS:
            msgs = r.get(key)
            assert isinstance(msgs, list) and len(msgs) == 2, (where, key)
            assert [m.get("role") for m in msgs] == ["user", "assistant"], (where, key)
            for m in msgs:
                assert set(m) == {"role", "content"}, (where, key)
                assert isinstance(m["content"], str) and m["content"].strip(), (where, key)
        assert r["prompt"] == r["init_prompt"], where
        assert r["messages"][0]["content"] == r["prompt"], where
        assert r["messages"][1]["content"] == r["revision_response"], where
        assert r["chosen"] == r["messages"], where
        assert r["rejected"][0]["content"] == r["prompt"], where
        assert r["rejected"][1]["content"] == r["init_response"], where
        assert r["revision_response"] != r["init_response"], where
        assert r["principle"] in by_id, (where, r["principle"])
        p = by_id[r["principle"]]
        assert r["critic_prompt"] == p["critique_request"], where
        assert r["revision_prompt"] == p["revision_request"], where
        assert p["name"].lower() in r["critic_response"].lower(), (where, "critique must name the principle")


@pytest.mark.parametrize("split", ["train", "test"])
def test_cai_revision_length(cai, split):
    for r in cai[split]:
        n = len(r["revision_response"].split())
        assert 35 <= n <= 90, (n, r["prompt"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_cai_no_duplicate_prompts(cai, split):
    seen = set()
    for r in cai[split]:
        key = norm(r["prompt"])
        assert key not in seen, r["prompt"]
        seen.add(key)


def test_cai_test_prompts_not_in_train(cai):
    train = {norm(r["prompt"]) for r in cai["train"]}
    leaked = [r["prompt"] for r in cai["test"] if norm(r["prompt"]) in train]
    assert not leaked, leaked


def test_redteam_prompts(redteam_prompts, cai):
    assert len(redteam_prompts) == 10
    seen = {norm(r["prompt"]) for split in ("train", "test") for r in cai[split]}
    for r in redteam_prompts:
        assert set(r) == {"prompt", "area"}
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert r["area"] in EXPECTED_AREAS, r["area"]
        assert norm(r["prompt"]) not in seen, r["prompt"]
    assert len({norm(r["prompt"]) for r in redteam_prompts}) == len(redteam_prompts)


# ----------------------------------------------------------------- helpful rows
def test_helpful_counts(helpful):
    assert len(helpful["train"]) + len(helpful["test"]) >= 300
    assert len(helpful["train"]) >= 1 and len(helpful["test"]) >= 1


@pytest.mark.parametrize("split", ["train", "test"])
def test_helpful_schema(helpful, split):
    for i, r in enumerate(helpful[split]):
        where = f"helpful_{split}.jsonl row {i}"
        assert set(r) == {"prompt", "completion", "category", "risky_sounding"}, where
        for key in HELPFUL_FIELDS:
            assert isinstance(r[key], str) and r[key].strip(), (where, key)
        assert isinstance(r["risky_sounding"], bool), where
        n = len(r["completion"].split())
        assert 30 <= n <= 90, (where, n)


@pytest.mark.parametrize("split", ["train", "test"])
def test_helpful_risky_sounding_share(helpful, split):
    rows = helpful[split]
    share = sum(r["risky_sounding"] for r in rows) / len(rows)
    assert share >= 0.25, share


@pytest.mark.parametrize("split", ["train", "test"])
def test_helpful_no_duplicate_prompts(helpful, split):
    seen = set()
    for r in helpful[split]:
        key = norm(r["prompt"])
        assert key not in seen, r["prompt"]
        seen.add(key)


def test_helpful_test_prompts_not_in_train(helpful):
    train = {norm(r["prompt"]) for r in helpful["train"]}
    leaked = [r["prompt"] for r in helpful["test"] if norm(r["prompt"]) in train]
    assert not leaked, leaked


# ----------------------------------------------------------------- generator
def test_generated_files_match_generator():
    """The committed files must be exactly what data/build_dataset.py produces."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, os.path.join(DATA, "build_dataset.py"), "--out", tmp],
            check=True, capture_output=True, text=True,
        )
        names = sorted(os.listdir(tmp))
        assert "cai_train.jsonl" in names
        match, mismatch, errors = filecmp.cmpfiles(DATA, tmp, names, shallow=False)
        assert not mismatch and not errors, (mismatch, errors)


@pytest.mark.parametrize("split", ["train", "test"])
def test_self_harm_and_medical_revisions_carry_resources(cai, split):
    """Every self-harm revision gives the crisis lines, every medical one poison control / emergency / doctor."""
    for r in cai[split]:
        text = r["revision_response"]
        if r["area"] == "self_harm":
            assert "988" in text and "Samaritans on 116 123" in text and "local emergency number" in text, text
        if r["area"] == "dangerous_medical":
            assert "1-800-222-1222" in text and "911 (US), 999 (UK) or 112 (EU)" in text, text
            assert "pharmacist or doctor" in text, text


def test_jailbreak_templates_bundled():
    with open(os.path.join(DATA, "jailbreaks.json"), encoding="utf-8") as f:
        data = json.load(f)
    for split in ("train", "eval"):
        families = {t["family"] for t in data[split]}
        assert {"role-play", "ignore-previous-instructions", "DAN-style"} <= families, (split, families)
    assert not {t["template"] for t in data["train"]} & {t["template"] for t in data["eval"]}

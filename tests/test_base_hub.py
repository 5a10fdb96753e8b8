"""Finding the base: a Hub repo id through huggingface_hub's real client against a Hub served on 127.0.0.1
(config and tokenizer first, weights only when a phase loads them, then offline from the cache), one-line
errors for an unknown repo, a missing revision, a model that is not a causal LM and one over base.max_params,
each before any weights are downloaded; and a base without chat template or pad token."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

from bases import EMOTIONS, ROOT, gpt2_base, llama_base
from conftest import serve
from persona_lm import base
from persona_lm.errors import ParamsError, PersonaError
from persona_lm.params import Base, parse_params
from persona_lm.tokenizer import TemplateTokenizer

pytest.importorskip("transformers")

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def hub(repos: dict[str, dict[str, bytes]]):
    """Enough of the Hub's model API for huggingface_hub: repo info, the tree listing and `resolve` downloads."""

    def not_found(code: str):
        return 404, {"X-Error-Code": code, "Content-Type": "application/json"}, json.dumps({"error": code}).encode()

    def handle(method, path, headers):
        path = unquote(path.split("?")[0])
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path):
            repo, kind, rev, _ = m.groups()
            if repo not in repos:
                return not_found("RepoNotFound")
            if rev not in ("main", COMMIT):
                return not_found("RevisionNotFound")
            files = repos[repo]
            if kind == "revision":
                body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]}
            else:
                body = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for n, b in files.items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo, rev, name = m.groups()
            if repo not in repos:
                return not_found("RepoNotFound")
            if name not in repos[repo]:
                return 404, {"X-Repo-Commit": COMMIT, "X-Error-Code": "EntryNotFound"}, b"{}"
            data = repos[repo][name]
            return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data
        return not_found("RepoNotFound")

    return handle


def as_repo(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def repos(tmp_path, monkeypatch):
    """A tiny Llama base and a BERT-style masked LM as Hub repos; an empty Hugging Face cache; online."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    tiny = as_repo(llama_base(tmp_path / "tiny"))
    bert = dict(tiny)
    config = json.loads(bert["config.json"])
    bert["config.json"] = json.dumps({**config, "architectures": ["BertForMaskedLM"], "model_type": "bert"}).encode()
    return {"acme/tiny": tiny, "acme/bert": bert}


def weight_requests(seen) -> list[str]:
    return [path for method, path in seen if path.endswith(".safetensors") and method == "GET"]


def test_repo_id_fetches_config_first_weights_when_loaded_then_works_offline(repos, monkeypatch):
    from huggingface_hub import constants

    with serve(hub(repos)) as (url, seen):
        bp = Base(model="acme/tiny", endpoint=url)
        folder, record = base.resolve(bp)
        assert record == {"model": "acme/tiny", "revision": "main", "sha": COMMIT, "source": "hub", "endpoint": url}
        assert base.check(folder, bp) > 0
        tok = TemplateTokenizer.build(folder, "text", EMOTIONS, record)
        assert not weight_requests(seen)  # the checks and the tokenizer need no weights
        online = base.load_hf(record, tok.vocab_size)
        assert weight_requests(seen) == [f"/acme/tiny/resolve/{COMMIT}/model.safetensors"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the server is gone: only the cache can answer
    folder, again = base.resolve(Base(model="acme/tiny"))
    assert again["sha"] == COMMIT
    offline = base.load_hf(again, tok.vocab_size)
    assert all((a == b).all() for a, b in zip(online.state_dict().values(), offline.state_dict().values()))


@pytest.mark.parametrize("repo, revision, message", [
    ("acme/missing", "main", "base.model: no model repository acme/missing on the Hub"),
    ("acme/tiny", "v9", "base.revision: 'v9' is not a branch, tag or commit of acme/tiny"),
])
def test_unknown_repo_or_revision_is_one_line_naming_the_key(repos, repo, revision, message):
    with serve(hub(repos)) as (url, seen):
        with pytest.raises(PersonaError, match=re.escape(message)):
            base.resolve(Base(model=repo, revision=revision, endpoint=url))
    assert len(seen) == 1  # one request, nothing downloaded


def test_not_a_causal_lm_is_refused_before_the_weights(repos):
    with serve(hub(repos)) as (url, seen):
        bp = Base(model="acme/bert", endpoint=url)
        folder, _ = base.resolve(bp)
        with pytest.raises(PersonaError, match=r"^base.model: acme/bert is not a causal language model "
                                               r"\(architectures: BertForMaskedLM\)"):
            base.check(folder, bp)
    assert not weight_requests(seen)


def test_a_base_over_max_params_is_refused_before_the_weights(repos):
    with serve(hub(repos)) as (url, seen):
        bp = Base(model="acme/tiny", endpoint=url, max_params=1000)
        folder, _ = base.resolve(bp)
        with pytest.raises(PersonaError, match=r"^base.max_params: acme/tiny has [\d,]+ parameters, more than "
                                               r"base.max_params \(1,000\)"):
            base.check(folder, bp)
    assert not weight_requests(seen)


def test_stage_error_is_one_line_and_writes_nothing(repos, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": {"model": "acme/missing"}}))
    with serve(hub(repos)) as (url, _):
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        params["base"]["endpoint"] = url
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        proc = subprocess.run([sys.executable, str(ROOT / "stages/train_tokenizer.py")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"),
                                   "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: base.model: no model repository acme/missing")
    assert not (tmp_path / "models").exists()


def test_offline_with_nothing_cached_says_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PersonaError, match=r"base.model: acme/tiny at 'main' is not in the Hugging Face cache"):
        base.resolve(Base(model="acme/tiny"))


# ------------------------------------------------------------------------------------------ other bad input

def test_base_model_must_look_like_a_folder_or_repo_id():
    with pytest.raises(ParamsError, match=r"^params.yaml: base.model: neither a local folder nor a Hub repo id"):
        parse_params({"base": {"model": "not a model"}})
    with pytest.raises(ParamsError, match=r"model.n_personas: a base-model run holds one persona \(got 2\)"):
        parse_params({"base": {"model": "acme/tiny"}, "model": {"n_personas": 2}})


def test_a_local_folder_without_safetensors_is_refused(tmp_path):
    folder = llama_base(tmp_path / "b")
    (folder / "model.safetensors").unlink()
    with pytest.raises(PersonaError, match=r"base.model: .* holds no .safetensors weights"):
        base.resolve(Base(model=str(folder)))


def test_no_chat_template_and_no_pad_token_get_ours(tmp_path):
    """GPT-2 style: our chat format is installed as the template (its markers become special tokens), and
    padding, never a target, uses the end-of-text id."""
    folder = gpt2_base(tmp_path / "gpt2")
    _, record = base.resolve(Base(model=str(folder)))
    tok = TemplateTokenizer.build(folder, "text", EMOTIONS, record)
    assert tok.info["own_template"] and tok.close == "<|end|>" and tok.pad == tok.eot == tok.hf.eos_token_id
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    ids, mask, ends = tok.render(turns)
    assert tok.tok.decode(ids, skip_special_tokens=False) == "<|user|>Hi<|end|><|assistant|>Hello!<|end|>"
    assert tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "Hello!<|end|>"
    assert ids[ends[0]] == tok.end

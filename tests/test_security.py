"""A team's setup, secure as the docs write it (issue 30): model servers take an API key and
refuse to listen beyond loopback without one; explore reaches a Dask cluster over mutual TLS
and warns about plain tcp:// off loopback. Real parts: the `bdc serve` app over a real tiny
model, the `bdc serve` command, a Dask cluster with TLS started here. vLLM's server with a
key: `tests/test_vllm.py` (its module's server runs with one); no key in any file the
pipeline writes: `tests/test_paper_pipeline.py`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdc.boost.dask_shards import ClusterError, dask_client
from bdc.config import ClusterSettings, TLSSettings
from bdc.llm.serve import authorized, check_exposure, create_app
from bdc.llm.tiny import build_tiny_model
from bdc.processes import is_loopback

KEY = "sk-bdc-test-4f1c"  # a canary: no file or message may ever show it
BDC = str(Path(sys.executable).parent / "bdc")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.test_agents import CORPUS, SMALL

    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", SMALL, CORPUS, seed=0)


def test_a_served_model_answers_401_without_its_key_and_generates_nothing(tiny):
    """`bdc serve` answered anyone who reached its port. With a key, a request without it,
    with a wrong one or with another scheme gets OpenAI's 401 (`invalid_api_key`) before the
    model sees it; the key's holder is served."""
    from starlette.testclient import TestClient

    from bdc.llm.backends import HFBackend

    backend = HFBackend(str(tiny), 4)
    calls = []
    generate = backend.generate

    async def counted(request):
        calls.append(request)
        return await generate(request)

    backend.generate = counted
    body = {"model": "tiny", "prompt": "### Problem", "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(backend, "tiny", KEY)) as http:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
            for path, method in (("/v1/completions", http.post), ("/v1/models", http.get),
                                 ("/v1/chat/completions", http.post)):
                answer = method(path, headers=headers,
                                **({"json": body} if method == http.post else {}))
                assert answer.status_code == 401, (path, headers)
                assert answer.json()["error"]["code"] == "invalid_api_key"
                assert KEY not in answer.text
        assert calls == []
        ok = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["choices"] and len(calls) == 1
    with TestClient(create_app(backend, "tiny")) as http:  # no key: loopback use, as before
        assert http.post("/v1/completions", json=body).status_code == 200


def test_the_key_is_a_bearer_token_compared_whole():
    assert authorized(f"Bearer {KEY}", KEY) and authorized(f"bearer  {KEY} ", KEY)
    for header in (None, "", "Bearer", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Token {KEY}"):
        assert not authorized(header, KEY)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_serving_beyond_loopback_without_a_key_is_refused(tmp_path, engine):
    """The team docs started `bdc serve --host 0.0.0.0` with no key: anyone on the network
    could use the model server (and vLLM's loads adapters from any path it is sent). Without
    the key's variable such a start fails at once, naming the variable and the way out, for
    both engines, before a model loads."""
    env = {k: v for k, v in os.environ.items() if k != "BDC_SERVE_API_KEY"}
    done = subprocess.run([BDC, "serve", "--engine", engine, "--model", str(tmp_path / "none"),
                           "--host", "0.0.0.0", "--port", "1"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert "--host 0.0.0.0" in message and "BDC_SERVE_API_KEY" in message
    assert "--allow-open" in message and "Traceback" not in done.stderr


def test_an_open_server_is_allowed_only_by_its_flag_and_loudly():
    assert check_exposure("127.0.0.1", None, False, "K") is None
    assert check_exposure("::1", None, False, "K") is None
    assert check_exposure("localhost", None, False, "K") is None
    assert check_exposure("0.0.0.0", KEY, False, "K") is None
    assert "WITHOUT an API key" in check_exposure("0.0.0.0", None, True, "K")
    for host in ("0.0.0.0", "10.0.0.5", "gpu.internal", "::"):
        assert not is_loopback(host)
        with pytest.raises(Exception, match="no API key"):
            check_exposure(host, None, False, "K")


# ----------------------------------------------------------------------------- Dask


def tls_files(folder: Path, security) -> TLSSettings:
    """A Dask ``Security``'s credentials as the PEM files a team's settings name."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca_file": security.tls_ca_file, "cert_file": security.tls_client_cert,
             "key_file": security.tls_client_key}
    for name, pem in files.items():
        (folder / f"{name}.pem").write_text(pem)
    return TLSSettings(**{name: str(folder / f"{name}.pem") for name in files})


def test_explore_reaches_a_tls_cluster_with_the_files_its_settings_name(tmp_path):
    """The cluster example was plain tcp://: anyone who reached the scheduler could submit
    work its workers would run. A cluster started here with mutual TLS: the client built from
    `explore.cluster.tls` runs a task on it; a client with another CA's certificate is
    refused; a tls:// address without the files is a settings error."""
    from distributed import LocalCluster
    from distributed.security import Security

    cluster_security = Security.temporary()
    with LocalCluster(n_workers=1, processes=False, protocol="tls://", host="127.0.0.1",
                      security=cluster_security, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        ours = ClusterSettings(address=cluster.scheduler_address,
                               tls=tls_files(tmp_path / "ours", cluster_security),
                               wait_for_workers_s=30)
        with dask_client(ours) as client:
            assert client.submit(sum, [20, 22]).result(timeout=30) == 42
        stranger = ours.model_copy(update={"tls": tls_files(tmp_path / "stranger",
                                                            Security.temporary())})
        with pytest.raises((ClusterError, OSError)), dask_client(stranger):
            pass
    with pytest.raises(ValueError, match="tls"):
        ClusterSettings(address="tls://scheduler.internal:8786")
    missing = ours.model_copy(update={"tls": ours.tls.model_copy(
        update={"key_file": str(tmp_path / "nope.pem")})})
    with pytest.raises(ClusterError, match="explore.cluster.tls.key_file"), \
            dask_client(missing):
        pass


def test_a_plain_tcp_scheduler_off_loopback_is_a_warning_naming_the_risk(caplog):
    from bdc.boost.dask_shards import security

    with caplog.at_level(logging.WARNING):
        security(ClusterSettings(address="tcp://127.0.0.1:8786"))
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        security(ClusterSettings(address="tcp://scheduler.internal:8786"))
    (record,) = caplog.records
    assert "scheduler.internal" in record.message and "any code" in record.message
    assert "tls://" in record.message

"""Storage on S3 and output URLs like Replicate's (issue 14): the seam, the signed links, retention, and the
official clients reading outputs on local disk and on S3.

S3 is moto's standalone server over HTTP on loopback; the product reaches it only through boto3 with an
endpoint URL and credentials from boto3's own chain (the environment), as it would reach MinIO or AWS.
The official clients turn only https outputs into `FileOutput`s, so the servers sit behind TLS on loopback
(a test CA the clients trust through SSL_CERT_FILE and NODE_EXTRA_CA_CERTS), as behind a load balancer.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import replicate
from conftest import make_image, probe
from fastapi.testclient import TestClient
from hardening import FAULT_ENV
from replicate.helpers import FileOutput
from s3_and_tls import AWS_ENV, LocalCA, MotoS3, tls_in_front
from serverproc import MODEL, PREDICTIONS, TOKEN, ServerProcess, data_uri, free_port

from i2v.server.app import create_app
from i2v.server.config import ConfigError, ServerConfig
from i2v.server.limits import token_owner
from i2v.server.links import KEY_FILE, OutputLinks, sign
from i2v.server.schemas import APIError
from i2v.server.states import QUEUED, SUCCEEDED
from i2v.server.storage import (
    LocalStorage,
    S3Storage,
    input_key,
    output_key,
    poster_key,
)
from i2v.server.store import PredictionRow, StorageError, utcnow
from i2v.video import write_mp4

ROOT = Path(__file__).resolve().parents[1]
JS_CLIENT = ROOT / "tests" / "web-tools" / "node_modules" / "replicate"
PREFIX = "team/i2v"


@pytest.fixture(scope="module")
def aws() -> Iterator[None]:
    """boto3's credential chain finds these in the environment, in this process and the servers'."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def moto(aws) -> Iterator[MotoS3]:
    s3 = MotoS3()
    yield s3
    s3.stop()


@pytest.fixture(scope="module")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small real mp4 (the first frame red) to store and serve."""
    frames = np.zeros((6, 64, 96, 3), dtype=np.uint8)
    frames[0, :, :, 0] = 255
    path = tmp_path_factory.mktemp("mp4") / "clip.mp4"
    write_mp4(frames, path, size=(96, 64), fps=24, preset="ultrafast")
    return path.read_bytes()


# ---------- the seam ----------


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path: Path, moto: MotoS3) -> LocalStorage | S3Storage:
    if request.param == "local":
        made: LocalStorage | S3Storage = LocalStorage(tmp_path / "data")
    else:
        made = S3Storage(moto.new_bucket(), PREFIX, moto.endpoint)
    made.check()
    return made


def test_the_seam_stores_reads_ranges_lists_and_deletes_the_same_way_on_disk_and_on_s3(
    storage, tmp_path, moto
):
    key = output_key("p1")
    storage.put_bytes(key, b"0123456789", "video/mp4")
    assert storage.read(key) == b"0123456789"
    assert b"".join(storage.read_range(key, 2, 5)) == b"234"
    assert b"".join(storage.read_range(key, 7, None)) == b"789"
    info = storage.stat(key)
    assert info.size == 10 and info.etag.startswith('"') and info.modified.tzinfo is not None
    # a local file is put (moved, or uploaded) and is gone afterwards: the worker's staged mp4
    local = tmp_path / "made.bin"
    local.write_bytes(b"x" * 3000)
    storage.put_file(input_key("p1", "start_image"), local, "application/octet-stream")
    assert not local.exists() and storage.read(input_key("p1", "start_image")) == b"x" * 3000
    assert [k for k, _ in storage.keys("inputs/")] == ["inputs/p1.start_image"]
    # a worker on another machine opens the same storage from the job's pickle
    again = pickle.loads(pickle.dumps(storage))
    assert again == storage and again.read(key) == b"0123456789"
    storage.delete(key)
    storage.delete(key)  # a missing one is no error
    assert storage.stat(key) is None
    with pytest.raises(FileNotFoundError):
        storage.read(key)
    with pytest.raises(FileNotFoundError):
        storage.read_range(key, 0, None)
    for bad in ("outputs/../i2v.db", "i2v.db", "files/a/b", "outputs/.x.mp4.partial", "../x"):
        with pytest.raises(ValueError):
            storage.stat(bad)
    if isinstance(storage, S3Storage):  # under the prefix, nothing else in the bucket
        assert all(k.startswith(PREFIX + "/") for k in moto.keys(storage.bucket))


def test_s3_settings_and_buckets_that_cannot_be_used_say_what_to_fix(moto, tmp_path):
    with pytest.raises(StorageError, match="the bucket does not exist"):
        S3Storage("no-such-bucket-here", "", moto.endpoint).check()
    for variable, value, rule in [
        ("I2V_STORAGE_URL", "https://bucket/x", "expected s3://bucket or s3://bucket/prefix"),
        ("I2V_STORAGE_URL", "s3://Bad_Bucket/x", "is not a bucket name"),
        ("I2V_S3_ENDPOINT_URL", "minio:9000", "expected an http(s) URL"),
        ("I2V_OUTPUT_URLS", "public", "I2V_OUTPUT_URLS"),
    ]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(variable, value)
            with pytest.raises(ConfigError, match=variable) as caught:
                ServerConfig(data_dir=tmp_path, no_auth=True)
            assert rule in str(caught.value)
    with pytest.raises(ConfigError, match="I2V_OUTPUT_URLS=presigned needs S3 storage"):
        ServerConfig(data_dir=tmp_path, no_auth=True, output_urls="presigned")
    config = ServerConfig(
        data_dir=tmp_path, no_auth=True, storage_url="s3://my-bucket/a/b/", s3_endpoint_url="http://m:9/"
    )
    assert config.storage() == S3Storage("my-bucket", "a/b", "http://m:9")
    assert ServerConfig(data_dir=tmp_path, no_auth=True).storage() == LocalStorage(tmp_path)


# ---------- signed links ----------


def succeeded_row(prediction_id: str, owner: str = TOKEN, completed_ago: float = 0.0) -> PredictionRow:
    now = utcnow() - timedelta(seconds=completed_ago)
    return PredictionRow(
        id=prediction_id, model=MODEL, version="v", input={"prompt": "x", "start_image": "data:,"},
        status=SUCCEEDED, output=f"{prediction_id}.mp4", logs="", created_at=now - timedelta(seconds=5),
        started_at=now - timedelta(seconds=4), completed_at=now, predict_time=4.0,
        base_url="http://127.0.0.1:9", attempts=1, webhook_events_filter=[], data_removed=False,
        cancel_requested=False, owner=token_owner(owner),
    )  # fmt: skip


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_signed_links_check_their_signature_and_time_with_clear_refusals(tmp_path):
    config = ServerConfig(data_dir=tmp_path, tokens=(TOKEN,), output_url_lifetime="1h")
    row = succeeded_row("abc")
    made = row.completed_at.replace(tzinfo=UTC).timestamp()
    clock = Clock(made)
    links = OutputLinks(config, LocalStorage(tmp_path), b"k" * 32, clock)
    url = links.url(row, "https://video.example.com")
    assert url.startswith("https://video.example.com/outputs/abc.mp4?expires=")
    given = query(url)
    assert int(given["expires"]) == math.floor(made) + 3600
    assert links.verify("abc.mp4", given["expires"], given["signature"]) == "abc"
    clock.now += 60
    assert links.url(row, "https://video.example.com") == url  # the same link within a step (150 s here)

    def refused(name: str, expires: str | None, signature: str | None) -> str:
        with pytest.raises(APIError) as caught:
            links.verify(name, expires, signature)
        assert caught.value.problem.status == 403
        return caught.value.problem.detail

    flipped = ("A" if given["signature"][0] != "A" else "B") + given["signature"][1:]
    assert "does not match" in refused("abc.mp4", given["expires"], flipped)
    assert "does not match" in refused("abd.mp4", given["expires"], given["signature"])  # another output
    assert "does not match" in refused("abc.mp4", str(int(given["expires"]) + 9), given["signature"])
    assert "not signed" in refused("abc.mp4", None, given["signature"])
    assert "not signed" in refused("abc.mp4", "-1", given["signature"])
    assert "not signed" in refused("abc.mp4", given["expires"], None)
    clock.now = int(given["expires"])  # the lifetime is over: no waiting, the clock says so
    assert "expired at" in refused("abc.mp4", given["expires"], given["signature"])
    assert links.url(row, "https://video.example.com") != url  # a fresh GET gets a fresh link
    with pytest.raises(APIError) as caught:
        links.verify("../i2v.db", given["expires"], given["signature"])
    assert caught.value.problem.status == 404
    # another server's key signs other links (a load balancer's servers need one I2V_OUTPUT_URL_SECRET)
    other = OutputLinks(config, LocalStorage(tmp_path), b"j" * 32, clock)
    assert sign(other.key, "abc", 10) != sign(links.key, "abc", 10)

    # with retention, a link lasts exactly as long as the output: the same link in every answer
    kept = ServerConfig(data_dir=tmp_path, tokens=(TOKEN,), retention="2h")
    removal = OutputLinks(kept, LocalStorage(tmp_path), b"k" * 32, clock)
    clock.now = made
    first = query(removal.url(row, "b"))["expires"]
    clock.now += 3000
    assert query(removal.url(row, "b"))["expires"] == first == str(math.floor(made + 7200))
    token = ServerConfig(data_dir=tmp_path, tokens=(TOKEN,), output_urls="token")
    assert OutputLinks(token, LocalStorage(tmp_path), b"k", clock).url(row, "b") == (
        "b/v1/predictions/abc/output.mp4"
    )


# ---------- the app in-process, on S3 (no worker runs: rows and objects are put as a worker leaves them)


def s3_app(tmp_path: Path, moto: MotoS3, **settings: Any):
    bucket = moto.new_bucket()
    config = ServerConfig(
        data_dir=tmp_path / "data",
        tokens=(TOKEN,),
        storage_url=f"s3://{bucket}/{PREFIX}",
        s3_endpoint_url=moto.endpoint,
        **settings,
    )
    return create_app(config), bucket


def put_output(app, prediction_id: str, mp4: bytes, **row: Any) -> PredictionRow:
    service = app.state.service
    service.storage.put_bytes(output_key(prediction_id), mp4, "video/mp4")
    service.storage.put_bytes(poster_key(prediction_id), b"\xff\xd8 poster", "image/jpeg")
    stored = succeeded_row(prediction_id, **row)
    service.store.add(stored)
    return stored


def api(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1:9", headers={"authorization": f"Bearer {TOKEN}"})


def test_on_s3_a_signed_link_streams_the_object_with_head_etags_and_ranges(tmp_path, moto, mp4):
    app, bucket = s3_app(tmp_path, moto)
    put_output(app, "clip", mp4)
    body = api(app).get("/v1/predictions/clip").json()
    url = body["output"]
    assert url.startswith("http://127.0.0.1:9/outputs/clip.mp4?expires=")
    anyone = TestClient(app, base_url="http://127.0.0.1:9")  # no token: the link is the credential
    full = anyone.get(url)
    assert full.status_code == 200 and full.content == mp4
    assert full.headers["content-type"] == "video/mp4" and full.headers["access-control-allow-origin"] == "*"
    assert full.headers["accept-ranges"] == "bytes" and full.headers["etag"]
    assert full.headers["content-disposition"] == 'inline; filename="clip.mp4"'
    head = anyone.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(mp4))
    part = anyone.get(url, headers={"range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == mp4[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(mp4)}"
    assert anyone.get(url, headers={"range": f"bytes={len(mp4) - 10}-"}).content == mp4[-10:]
    assert anyone.get(url, headers={"if-none-match": full.headers["etag"]}).status_code == 304
    backwards = anyone.get(url, headers={"range": "bytes=500-100"})
    assert backwards.status_code == 416 and backwards.headers["content-range"] == f"bytes */{len(mp4)}"
    assert anyone.get(url, headers={"range": "lines=1-2"}).content == mp4  # another unit: ignored
    assert anyone.get(url, headers={"range": "bytes=0-9", "if-range": '"old"'}).status_code == 200
    refused = anyone.get(url.replace("signature=", "signature=x"))
    assert refused.status_code == 403 and "does not match" in refused.json()["detail"]
    # the token route serves the same bytes behind the token, the poster too
    assert api(app).get("/v1/predictions/clip/output.mp4").content == mp4
    assert anyone.get("/v1/predictions/clip/output.mp4").status_code == 401
    assert api(app).get("/v1/predictions/clip/poster.jpg").content == b"\xff\xd8 poster"
    # the bytes are in the bucket under the prefix, none in the data folder
    assert moto.keys(bucket) == [f"{PREFIX}/outputs/clip.jpg", f"{PREFIX}/outputs/clip.mp4"]
    assert not (tmp_path / "data" / "outputs").exists()


def test_on_s3_uploads_are_objects_read_for_inputs_and_deleted_with_their_rows(tmp_path, moto):
    app, bucket = s3_app(tmp_path, moto)
    client = api(app)
    content = bytes(range(256)) * 40
    upload = client.post("/v1/files", files={"content": ("a.bin", content, "application/octet-stream")})
    assert upload.status_code == 201, upload.text
    file_id = upload.json()["id"]
    assert moto.keys(bucket) == [f"{PREFIX}/files/{file_id}"]
    download = client.get(f"/v1/files/{file_id}/download")
    assert download.content == content and download.headers["content-disposition"].endswith('"a.bin"')
    assert client.get(f"/v1/files/{file_id}/download", headers={"range": "bytes=0-9"}).content == content[:10]
    assert app.state.service.files.read(file_id) == content  # what a create reads for an uploaded image
    assert client.delete(f"/v1/files/{file_id}").status_code == 204
    assert moto.keys(bucket) == []
    assert client.get(f"/v1/files/{file_id}/download").status_code == 404


def test_retention_deletes_the_objects_of_outputs_and_uploads_on_s3(tmp_path, moto, mp4):
    app, bucket = s3_app(tmp_path, moto, retention="1h")
    service = app.state.service
    put_output(app, "old", mp4, completed_ago=2 * 3600)
    put_output(app, "new", mp4)
    upload = api(app).post("/v1/files", files={"content": ("a.png", b"png", "image/png")}).json()
    service.expire(utcnow() + timedelta(hours=2))  # the sweep as it runs two hours from now
    assert moto.keys(bucket) == []  # both outputs, their posters and the upload
    old = api(app).get("/v1/predictions/old").json()
    assert old["data_removed"] is True and old["output"] is None and old["status"] == "succeeded"
    assert api(app).get(f"/v1/files/{upload['id']}").status_code == 404


def test_orphan_inputs_on_s3_go_at_start_once_no_other_server_may_be_writing_them(tmp_path, moto):
    app, bucket = s3_app(tmp_path, moto)
    service = app.state.service
    service.store.add(succeeded_row("ended"))
    waiting = succeeded_row("waiting")
    waiting.status, waiting.output, waiting.completed_at = QUEUED, None, None
    service.store.add(waiting)
    for prediction_id in ("ended", "norow", "waiting"):
        service.storage.put_bytes(input_key(prediction_id, "start_image"), b"img", "image/png")
    service._remove_orphans(3600.0)  # several servers on one database: only what is an hour old
    assert len(moto.keys(bucket)) == 3
    service._remove_orphans(0.0)  # one server: everything no prediction waits for
    assert moto.keys(bucket) == [f"{PREFIX}/inputs/waiting.start_image"]


def test_presigned_outputs_are_the_buckets_own_urls_lasting_the_link_lifetime(tmp_path, moto, mp4):
    app, _ = s3_app(tmp_path, moto, output_urls="presigned", output_url_lifetime="30m")
    put_output(app, "clip", mp4)
    url = api(app).get("/v1/predictions/clip").json()["output"]
    assert url.startswith(f"{moto.endpoint}/") and f"/{PREFIX}/outputs/clip.mp4?" in url
    signed = query(url)
    assert signed["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and 1700 <= int(signed["X-Amz-Expires"]) <= 1800
    assert httpx.get(url).content == mp4  # from the bucket, no token, no server in between


def test_token_output_urls_stay_behind_the_token_and_signed_links_stop_working(tmp_path, moto, mp4):
    app, _ = s3_app(tmp_path, moto)
    put_output(app, "clip", mp4)
    signed = api(app).get("/v1/predictions/clip").json()["output"]
    app_token, _ = s3_app(tmp_path / "t", moto, output_urls="token")
    put_output(app_token, "clip", mp4)
    url = api(app_token).get("/v1/predictions/clip").json()["output"]
    assert url == "http://127.0.0.1:9/v1/predictions/clip/output.mp4"
    assert TestClient(app_token).get(url).status_code == 401 and api(app_token).get(url).content == mp4
    refused = TestClient(app_token).get(signed.replace("http://127.0.0.1:9", ""))
    assert refused.status_code == 403 and "I2V_OUTPUT_URLS=token" in refused.json()["detail"]


# ---------- servers behind https, the official clients ----------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"))


class Served:
    def __init__(self, kind: str, server: ServerProcess, url: str, storage: S3Storage | None) -> None:
        self.kind, self.server, self.url, self.storage = kind, server, url, storage


@pytest.fixture(scope="module", params=["local", "s3"])
def served(request, tmp_path_factory, ca: LocalCA, moto: MotoS3, _cache_dir) -> Iterator[Served]:
    """`i2v serve` behind https: on S3 with the tiny model; on local disk, which the rest of the suite
    renders with the tiny model already, with the fault-injection backend (black frames through the same
    writer, at once), to keep the suite's time."""
    port = free_port()
    env = {"I2V_PUBLIC_URL": f"https://127.0.0.1:{port}", **AWS_ENV}
    storage, model = None, "tiny"
    if request.param == "s3":
        storage = S3Storage(moto.new_bucket(), PREFIX, moto.endpoint)
        env |= {"I2V_STORAGE_URL": f"s3://{storage.bucket}/{PREFIX}", "I2V_S3_ENDPOINT_URL": moto.endpoint}
    else:
        env |= FAULT_ENV
        model = "fault-injection"
    data_dir = tmp_path_factory.mktemp(f"storage-{request.param}") / "data"
    server = ServerProcess(data_dir, env=env, model=model)
    try:
        server.wait_ready()
        with tls_in_front(ca, port, server.port) as proxy:
            yield Served(request.param, server, proxy.url, storage)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def python_run(served: Served, ca: LocalCA, tmp_path_factory) -> tuple[str, bytes]:
    """`replicate.run(..., use_file_output=True)` then `.read()`, exactly as Replicate's docs have it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(ca.path))  # trust the test CA, as a machine trusts its own
        client = replicate.Client(api_token=TOKEN, base_url=served.url)
        output = client.run(
            MODEL, input={"prompt": "a calm sea", "start_image": data_uri(640, 360)}, use_file_output=True
        )
        assert isinstance(output, FileOutput), output
        return output.url, output.read()


def check_mp4(data: bytes, folder: Path) -> dict[str, Any]:
    path = folder / "out.mp4"
    path.write_bytes(data)
    info = probe(path)
    assert (
        info["codec"] == "h264" and info["frames"] == 121 and (info["width"], info["height"]) == (1280, 720)
    )
    return info


def test_the_python_clients_file_output_reads_the_mp4(served: Served, python_run, tmp_path):
    url, data = python_run
    assert url.startswith(f"{served.url}/outputs/") and "signature=" in url
    check_mp4(data, tmp_path)
    prediction_id = url.split("/outputs/")[1].split(".mp4")[0]
    if served.kind == "s3":  # the worker put the mp4 and its poster into the bucket; the data folder has none
        s3 = served.storage
        assert s3.read(output_key(prediction_id)) == data and s3.stat(poster_key(prediction_id)) is not None
        assert not list((served.server.data_dir / "outputs").glob("*"))
    else:
        assert (served.server.data_dir / "outputs" / f"{prediction_id}.mp4").read_bytes() == data


def test_the_js_clients_file_output_blob_is_the_mp4(served: Served, ca: LocalCA, tmp_path):
    if not JS_CLIENT.is_dir() or not shutil.which("node"):
        pytest.skip("node or the JS client is missing: ./setup.sh --dev installs them")
    out = tmp_path / "blob.mp4"
    script = f"""
const Replicate = require({json.dumps(str(JS_CLIENT))});
const fs = require("fs");
(async () => {{
  const replicate = new Replicate({{ auth: {json.dumps(TOKEN)}, baseUrl: {json.dumps(served.url + "/v1")} }});
  const output = await replicate.run({json.dumps(MODEL)}, {{ input: {{ prompt: "a calm sea",
    start_image: {json.dumps(data_uri(640, 360, seed=1))} }} }});
  const blob = await output.blob();
  fs.writeFileSync({json.dumps(str(out))}, Buffer.from(await blob.arrayBuffer()));
  console.log(JSON.stringify({{ url: String(output), type: blob.type }}));
}})().catch((err) => {{ console.error(err); process.exit(1); }});
"""
    env = {**os.environ, **ca.env}
    ran = subprocess.run(["node", "-e", script], capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr + served.server.log_tail()
    told = json.loads(ran.stdout.strip().splitlines()[-1])
    assert told["url"].startswith(f"{served.url}/outputs/") and told["type"] == "video/mp4"
    check_mp4(out.read_bytes(), tmp_path)


def test_the_served_link_refuses_tampering_and_expiry_and_streams_ranges(served: Served, python_run, ca):
    url, data = python_run
    given = query(url)
    prediction_id = url.split("/outputs/")[1].split(".mp4")[0]
    base = url.split("?")[0]
    key = bytes.fromhex((served.server.data_dir / KEY_FILE).read_text())
    with httpx.Client(verify=ssl.create_default_context(cafile=ca.path), timeout=30) as http:
        assert http.get(url, headers={"authorization": "Bearer anything"}).content == data  # ignored
        head = http.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
        part = http.get(url, headers={"range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == data[:100]
        assert http.get(url, headers={"if-none-match": head.headers["etag"]}).status_code == 304
        assert http.get(url, headers={"range": "bytes=500-100"}).status_code == 416
        tampered = {
            "signature": f"{base}?expires={given['expires']}&signature={given['signature'][::-1]}",
            "expiry": f"{base}?expires={int(given['expires']) + 86400}&signature={given['signature']}",
            "output": url.replace(prediction_id, "a" * len(prediction_id)),
        }
        for what, link in tampered.items():
            answer = http.get(link)
            assert answer.status_code == 403, what
            assert (
                answer.json()
                == {
                    "title": "Forbidden",
                    "status": 403,
                    "detail": answer.json()["detail"],
                }
                and "does not match" in answer.json()["detail"]
            ), what
        past = 1_600_000_000  # signed with this server's own key, but its time is over
        expired = http.get(f"{base}?expires={past}&signature={sign(key, prediction_id, past)}")
        assert expired.status_code == 403 and "expired at 2020-09-13T12:26:40Z" in expired.json()["detail"]
        assert http.get(base).status_code == 403
        assert http.get(f"{served.url}/outputs/..%2Fi2v.db?{urlsplit(url).query}").status_code == 404


# ---------- several servers on one database, each with its own data dir, sharing only the bucket


def test_servers_on_one_database_need_no_shared_data_dir_with_s3(tmp_path, moto, postgres, _cache_dir):
    """Each server's data dir is its own (on a shared data dir check they would refuse to start): an upload
    on A is an input on B, an output made on either is served by the other at the same signed link."""
    storage = S3Storage(moto.new_bucket(), PREFIX, moto.endpoint)
    env = {
        **AWS_ENV,
        **FAULT_ENV,
        "I2V_DATABASE_URL": postgres.new_database(),
        "I2V_STORAGE_URL": f"s3://{storage.bucket}/{PREFIX}",
        "I2V_S3_ENDPOINT_URL": moto.endpoint,
        "I2V_PUBLIC_URL": "http://video.example.com",  # the load balancer's: both servers answer for it
    }
    servers = [ServerProcess(tmp_path / f"data-{n}", env=env, model="fault-injection") for n in (0, 1)]
    try:
        for server in servers:
            server.wait_ready()
        a, b = (server.http() for server in servers)
        with a, b:
            upload = a.post("/v1/files", files={"content": ("s.png", make_image(400, 400), "image/png")})
            assert upload.status_code == 201, upload.text
            body = {"input": {"prompt": "x", "start_image": upload.json()["urls"]["get"]}}
            made = b.post(PREDICTIONS, json=body, headers={"prefer": "wait=60"}).json()
            assert made["status"] == "succeeded", made  # the upload read from the bucket, wherever it ran
            link = made["output"].split("/outputs/")[1]
            assert a.get(f"/v1/predictions/{made['id']}").json()["output"].split("/outputs/")[1] == link
            for server in servers:  # the same link, served by either
                video = httpx.get(f"{server.base}/outputs/{link}")
                assert video.status_code == 200 and video.content == storage.read(output_key(made["id"]))
        for server in servers:
            assert not list((server.data_dir / "outputs").glob("*")), "no bytes in a data dir"
    finally:
        for server in servers:
            server.stop()

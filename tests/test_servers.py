"""The real servers of tests/servers.py work: S3 (moto) with pyarrow and boto3, PostgreSQL, the Prefect
server on PostgreSQL, and headless Chromium rendering the Prefect UI."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import urllib.request

import pytest

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------- S3


def _roundtrip(filesystem, path: str, data: bytes) -> None:
    from pyarrow import fs

    with filesystem.open_output_stream(path, compression=None) as out:
        out.write(data)
    info = filesystem.get_file_info(path)
    assert info.type == fs.FileType.File and info.size == len(data)
    with filesystem.open_input_stream(path, compression=None) as src:
        assert src.read() == data


def test_s3_pyarrow_roundtrip_is_byte_exact(s3_server):
    from pyarrow import fs

    bucket = s3_server.create_bucket()
    s3 = s3_server.filesystem()  # S3FileSystem(endpoint_override=..., scheme="http", ...)
    # A gzip name must not make pyarrow (de)compress: compression=None on both ends. 12 MB: a multipart upload.
    big, small = os.urandom(12 * 1024 * 1024 + 7), b"\x1f\x8b\x08\x00 not really gzip"
    _roundtrip(s3, f"{bucket}/archives/20news-bydate.tar.gz", big)
    _roundtrip(s3, f"{bucket}/archives/manifest.json", small)

    listed = s3.get_file_info(fs.FileSelector(f"{bucket}/archives", recursive=True))
    assert sorted((i.path, i.size) for i in listed) == [
        (f"{bucket}/archives/20news-bydate.tar.gz", len(big)), (f"{bucket}/archives/manifest.json", len(small))]
    # Another client sees the same bytes.
    body = s3_server.client().get_object(Bucket=bucket, Key="archives/20news-bydate.tar.gz")["Body"].read()
    assert body == big

    s3.delete_file(f"{bucket}/archives/manifest.json")
    assert s3.get_file_info(f"{bucket}/archives/manifest.json").type == fs.FileType.NotFound
    assert [i.path for i in s3.get_file_info(fs.FileSelector(bucket, recursive=True)) if i.type == fs.FileType.File] \
        == [f"{bucket}/archives/20news-bydate.tar.gz"]


def test_s3_from_uri_uses_aws_endpoint_url_from_the_environment(s3_server, monkeypatch):
    from pyarrow import fs

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.create_bucket()
    filesystem, path = fs.FileSystem.from_uri(f"s3://{bucket}/run-1/tokens.tar.gz")
    assert isinstance(filesystem, fs.S3FileSystem) and path == f"{bucket}/run-1/tokens.tar.gz"
    _roundtrip(filesystem, path, os.urandom(100_000))
    assert s3_server.client().head_object(Bucket=bucket, Key="run-1/tokens.tar.gz")["ContentLength"] == 100_000


def test_s3_conditional_put_if_none_match_refuses_an_existing_key(s3_server):
    """The object-store publishing design relies on create-only writes: If-None-Match: * -> 412 when the key exists."""
    from botocore.exceptions import ClientError

    client, bucket = s3_server.client(), s3_server.create_bucket()
    assert client.put_object(Bucket=bucket, Key="step/KEY/manifest.json", Body=b"first",
                             IfNoneMatch="*")["ResponseMetadata"]["HTTPStatusCode"] == 200
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=bucket, Key="step/KEY/manifest.json", Body=b"second", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    assert client.get_object(Bucket=bucket, Key="step/KEY/manifest.json")["Body"].read() == b"first"

    # The same for a multipart upload, checked when it completes.
    def multipart(body: bytes) -> None:
        upload = client.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
        part = client.upload_part(Bucket=bucket, Key="big", UploadId=upload, PartNumber=1, Body=body)
        client.complete_multipart_upload(Bucket=bucket, Key="big", UploadId=upload, IfNoneMatch="*",
                                         MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})

    multipart(b"first")
    with pytest.raises(ClientError) as refused:
        multipart(b"second")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == b"first"


# -------------------------------------------------------------------------------------- PostgreSQL


def test_postgres_serves_the_prefect_database_with_pg_trgm(postgres_server):
    import asyncpg

    assert postgres_server.url.startswith("postgresql+asyncpg://") and postgres_server.url.endswith("/prefect")

    async def check():
        connection = await asyncpg.connect(postgres_server.dsn)
        try:
            assert await connection.fetchval("SELECT current_database()") == "prefect"
            assert await connection.fetchval("SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'") == "pg_trgm"
            assert await connection.fetchval("SELECT similarity('newsgroups', 'newsgroup')") > 0.5
            return await connection.fetchval("SHOW server_version_num")
        finally:
            await connection.close()

    assert int(asyncio.run(check())) >= 130000


# ----------------------------------------------------------------------------------------- Prefect


def _create_flow_run(api_url: str, name: str):
    """Create (not run) a flow run through the Prefect client."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @flow(name="servers-smoke")
    def smoke():
        pass

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        created = client.create_flow_run(smoke, name=name)
        assert client.read_flow_run(created.id).name == name
    return created


def test_prefect_server_on_postgres_creates_a_flow_run(prefect_server, postgres_server):
    with urllib.request.urlopen(prefect_server.api_url + "/health", timeout=10) as response:
        assert json.load(response) is True
    name = f"smoke-{secrets.token_hex(4)}"
    _create_flow_run(prefect_server.api_url, name)
    # ... and it is in PostgreSQL, not in some SQLite file.
    assert postgres_server.psql(f"SELECT count(*) FROM flow_run WHERE name = '{name}'") == "1"


def test_chromium_renders_the_prefect_ui(chromium, prefect_server):  # chromium first: skip before starting servers
    from tests.servers import chromium_browser

    name = f"ui-{secrets.token_hex(4)}"
    run = _create_flow_run(prefect_server.api_url, name)
    with chromium_browser(chromium) as browser:
        page = browser.new_page()
        page.goto(prefect_server.ui_url, wait_until="load", timeout=60_000)
        assert page.title() == "Prefect Server"
        # The single-page app shows the run's name only after its JavaScript ran and fetched it from the API.
        page.goto(f"{prefect_server.ui_url}/runs/flow-run/{run.id}", wait_until="load", timeout=60_000)
        page.get_by_text(name).first.wait_for(timeout=60_000)
        assert "Unable to connect" not in page.inner_text("body")

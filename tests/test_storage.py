"""cladapter_core.storage: the same calls on local paths and file:// URIs, on fsspec's
in-memory filesystem (where S3 itself is not the point), and on the loopback S3-compatible
server (conftest `s3_server`, `s3_env`, `bucket`) where it is: round trips, listings,
ETags, credentials and endpoints from the environment, errors that name the URI. Then the
callers built on it: the training checkpoint mirror and the multi-node folder moves."""
import re
import uuid
from pathlib import Path

import pytest

from cladapter_core import storage
from cladapter_core.errors import CLAdapterError, DataError

TREE = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 40, "sub/deeper/c.txt": b""}


def make_tree(root: Path, files=TREE) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sizes(files=TREE) -> dict:
    return {rel: len(data) for rel, data in sorted(files.items())}


@pytest.fixture
def memory():
    """A fresh memory:// folder (fsspec's store is process-wide: removed afterwards)."""
    import fsspec
    uri = f"memory://cladapter-{uuid.uuid4().hex[:8]}"
    yield uri
    fs = fsspec.filesystem("memory")
    if fs.exists(uri):
        fs.rm(uri, recursive=True)


# -- names ---------------------------------------------------------------------------------------
def test_names_say_what_is_local():
    assert storage.local_path("file:///data/x") == "/data/x" and storage.local_path("/data/x") == "/data/x"
    assert [storage.is_remote(u) for u in ("/a", "rel/a", "file:///a", r"C:\a", "s3://b/k", "memory://x")] \
        == [False, False, False, False, True, True]
    assert storage.scheme("S3://b/k") == "s3" and storage.scheme(r"C:\w.pt") == ""


# -- (a) local paths and file:// -----------------------------------------------------------------
@pytest.mark.parametrize("form", ["path", "file://"])
def test_local_paths_and_file_uris_read_write_list_and_mirror(tmp_path, form):
    def uri(p: Path) -> str:
        return str(p) if form == "path" else f"file://{p}"

    src = make_tree(tmp_path / "src")
    (src / "sub" / "link").symlink_to(src / "sub" / "deeper")  # followed, as shutil.copytree does
    want = {**sizes(), "sub/link/c.txt": 0}
    assert {k: v["size"] for k, v in storage.list_files(uri(src)).items()} == want
    assert storage.list_files(uri(tmp_path / "none")) == {}

    with storage.open_file(uri(tmp_path / "new" / "deep" / "f.txt"), "wb") as fh:  # parents made
        fh.write(b"written")
    assert storage.exists(uri(tmp_path / "new" / "deep" / "f.txt")) and not storage.exists(uri(tmp_path / "x"))
    with storage.open_file(uri(tmp_path / "new" / "deep" / "f.txt")) as fh:
        assert fh.read() == b"written"
    assert storage.info(uri(src / "a.txt")) == {"size": 5, "etag": ""}

    storage.download(uri(src / "sub" / "b.bin"), tmp_path / "down" / "b.bin")
    storage.upload(tmp_path / "down" / "b.bin", uri(tmp_path / "up" / "b.bin"))
    assert (tmp_path / "up" / "b.bin").read_bytes() == TREE["sub/b.bin"]

    assert storage.copy_tree(uri(src), uri(tmp_path / "copy")) == sorted(want)
    assert read_tree(tmp_path / "copy") == {**TREE, "sub/link/c.txt": b""}
    assert storage.copy_tree(uri(src), uri(tmp_path / "part"), files=["a.txt"]) == ["a.txt"]
    assert read_tree(tmp_path / "part") == {"a.txt": b"alpha"}
    assert not [p for p in tmp_path.rglob("*.part-*")], "temporary files left behind"

    storage.remove(uri(tmp_path / "up" / "b.bin"))
    storage.remove(uri(tmp_path / "up" / "b.bin"))  # none there: no error
    assert not (tmp_path / "up" / "b.bin").exists()


def test_local_errors_name_the_path(tmp_path):
    where = re.escape(str(tmp_path))
    with pytest.raises(storage.NotFound, match=rf"cannot download {where}/missing: no such file or object"):
        storage.download(tmp_path / "missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(storage.NotFound, match=rf"cannot copy {where}/empty: no files under it"):
        storage.copy_tree(tmp_path / "empty", tmp_path / "dst")
    with pytest.raises(storage.StorageError, match="escapes the folder"):
        storage.copy_tree(tmp_path, tmp_path / "dst", files=["../outside"])
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # a dangling link fails loudly, by name
    with pytest.raises(storage.NotFound, match=rf"{where}/gone: no such file"):
        storage.copy_tree(tmp_path, tmp_path.parent / f"{tmp_path.name}-dst")
    assert issubclass(storage.StorageError, CLAdapterError)  # the CLI prints it without a traceback


# -- (b) fsspec's in-memory filesystem -----------------------------------------------------------
def test_the_same_calls_on_an_in_memory_filesystem(tmp_path, memory):
    src = make_tree(tmp_path / "src")
    assert storage.copy_tree(src, memory) == sorted(TREE)
    assert {k: v["size"] for k, v in storage.list_files(memory).items()} == sizes()
    assert storage.list_files(memory + "-sibling") == {}
    with storage.open_file(f"{memory}/note.txt", "wb") as fh:
        fh.write(b"in memory")
    assert storage.exists(f"{memory}/note.txt") and storage.info(f"{memory}/note.txt")["size"] == 9
    storage.download(f"{memory}/sub/b.bin", tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == TREE["sub/b.bin"]
    assert storage.copy_tree(memory, tmp_path / "back")[-1] == "sub/deeper/c.txt"
    assert read_tree(tmp_path / "back") == {**TREE, "note.txt": b"in memory"}
    storage.remove(f"{memory}/note.txt")
    assert not storage.exists(f"{memory}/note.txt")
    with pytest.raises(storage.NotFound, match=rf"{memory}/nothing: no such file or object"):
        storage.download(f"{memory}/nothing", tmp_path / "n")


# -- (c) the S3-compatible server ----------------------------------------------------------------
def test_s3_round_trips_listings_and_etags(tmp_path, bucket):
    import boto3
    s3 = boto3.client("s3")
    src = make_tree(tmp_path / "src")
    prefix = f"s3://{bucket}/data"
    assert storage.copy_tree(src, prefix + "/") == sorted(TREE)  # a trailing slash changes nothing
    s3.put_object(Bucket=bucket, Key="data/folder/", Body=b"")  # a folder marker
    s3.put_object(Bucket=bucket, Key="data-old/a.txt", Body=b"not under the prefix")
    listing = storage.list_files(prefix)
    assert {k: v["size"] for k, v in listing.items()} == sizes()
    assert all(v["etag"] == s3.head_object(Bucket=bucket, Key=f"data/{k}")["ETag"] for k, v in listing.items())
    assert storage.info(f"{prefix}/a.txt") == listing["a.txt"]
    assert storage.list_files(f"s3://{bucket}/nothing") == {}

    assert storage.copy_tree(prefix, tmp_path / "back") == sorted(TREE)
    assert read_tree(tmp_path / "back") == TREE
    storage.upload(src / "sub" / "b.bin", f"s3://{bucket}/one/b.bin")
    storage.download(f"s3://{bucket}/one/b.bin", tmp_path / "one" / "b.bin", etag=listing["sub/b.bin"]["etag"])
    assert (tmp_path / "one" / "b.bin").read_bytes() == TREE["sub/b.bin"]
    with storage.open_file(f"s3://{bucket}/one/w.txt", "wb") as fh:
        fh.write(b"via open_file")
    assert s3.get_object(Bucket=bucket, Key="one/w.txt")["Body"].read() == b"via open_file"
    with storage.open_file(f"s3://{bucket}/one/w.txt") as fh:
        assert fh.read() == b"via open_file"
    assert storage.exists(f"s3://{bucket}/one/w.txt") and not storage.exists(f"s3://{bucket}/one/x")
    storage.remove(f"s3://{bucket}/one/w.txt")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="one/w.txt")

    assert storage.copy_tree(prefix, f"s3://{bucket}/mirror", files=["a.txt"]) == ["a.txt"]  # S3 to S3
    assert s3.get_object(Bucket=bucket, Key="mirror/a.txt")["Body"].read() == b"alpha"


def test_s3_errors_name_the_uri_and_what_is_wrong(tmp_path, bucket):
    import boto3
    s3 = boto3.client("s3")
    with pytest.raises(storage.NotFound, match=rf"cannot download s3://{bucket}/no/such\.bin: no such file or object"):
        storage.download(f"s3://{bucket}/no/such.bin", tmp_path / "x")
    assert not list(tmp_path.iterdir()), "nothing written for a missing object"
    with pytest.raises(storage.NotFound, match="cannot list s3://no-such-bucket-here/x: no such bucket"):
        storage.list_files("s3://no-such-bucket-here/x")
    with pytest.raises(storage.StorageError, match=r"s3:///key: no bucket"):
        storage.exists("s3:///key")
    with pytest.raises(storage.NotFound, match=rf"cannot copy s3://{bucket}/empty: no files under it"):
        storage.copy_tree(f"s3://{bucket}/empty", tmp_path / "e")

    s3.put_object(Bucket=bucket, Key="d/f.txt", Body=b"first")
    etag = storage.info(f"s3://{bucket}/d/f.txt")["etag"]
    s3.put_object(Bucket=bucket, Key="d/f.txt", Body=b"changed")
    with pytest.raises(storage.Changed, match=rf"s3://{bucket}/d/f\.txt: changed") as err:
        storage.copy_tree(f"s3://{bucket}/d", tmp_path / "c", files=["f.txt"], etags={"f.txt": etag})
    assert err.value.uri == f"s3://{bucket}/d/f.txt" and err.value.etag == etag
    assert not (tmp_path / "c" / "f.txt").exists()


def test_s3_endpoint_and_credentials_come_from_the_environment(tmp_path, bucket, s3_iam, monkeypatch):
    """MLFLOW_S3_ENDPOINT_URL alone is enough; every call reads the variables afresh (no
    cached filesystem), so another endpoint or key pair applies at once."""
    import boto3
    boto3.client("s3").put_object(Bucket=bucket, Key="k.txt", Body=b"on the shared server")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # left: MLFLOW_S3_ENDPOINT_URL (conftest s3_env)
    assert storage.list_files(f"s3://{bucket}") == {"k.txt": storage.info(f"s3://{bucket}/k.txt")}

    (tmp_path / "f").write_bytes(b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_iam.endpoint)  # first in line: the IAM server
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    target = f"s3://{s3_iam.bucket}/k.txt"
    with pytest.raises(storage.StorageError, match=rf"cannot upload to {re.escape(target)}: .*Access Key") as err:
        storage.upload(tmp_path / "f", target)
    assert not isinstance(err.value, storage.NotFound)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_iam.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_iam.secret)
    storage.upload(tmp_path / "f", target)
    assert storage.list_files(f"s3://{s3_iam.bucket}")["k.txt"]["size"] == 1
    storage.remove(target)


# -- the callers ---------------------------------------------------------------------------------
def test_checkpoint_store_mirrors_to_a_folder_and_to_s3(tmp_path, bucket):
    from components.resume_mirror import ResumeMirror
    ckpt = tmp_path / "out.ckpt" / "last.pt"
    ckpt.parent.mkdir()
    for prefix in (f"file://{tmp_path / 'mirror'}", f"s3://{bucket}/ckpt"):
        store = ResumeMirror(prefix, "run-1", "train_stage1")
        assert not store.restore(tmp_path / "pod2" / "last.pt")  # nothing mirrored yet
        ckpt.write_bytes(b"epoch 1")
        assert store.push(ckpt) and not store.push(ckpt)  # unchanged: not copied again
        ckpt.write_bytes(b"epoch 2, longer")
        assert store.push(ckpt)
        assert store.restore(tmp_path / "pod2" / "last.pt")
        assert (tmp_path / "pod2" / "last.pt").read_bytes() == b"epoch 2, longer"
        store.clear()
        assert not store.restore(tmp_path / "pod3" / "last.pt")
    assert not (tmp_path / "mirror" / "run-1").exists()  # the emptied run folders go too
    assert not [p for p in tmp_path.rglob("*") if ".part-" in p.name]


def test_multinode_moves_folders_by_uri(tmp_path, bucket):
    from components import multinode
    src = make_tree(tmp_path / "model")
    for uri in (f"s3://{bucket}/stage/model", f"file://{tmp_path / 'shared'}", str(tmp_path / "plain")):
        multinode.push(src, uri)
        assert read_tree(multinode.fetch(uri, tmp_path / "fetched" / uri.split("/")[-2])) == TREE
    assert multinode._local(f"file://{tmp_path / 'shared'}", tmp_path / "unused") == tmp_path / "shared"
    assert read_tree(multinode._local(f"s3://{bucket}/stage/model", tmp_path / "dl")) == TREE
    with pytest.raises(storage.NotFound, match=rf"s3://{bucket}/stage/none"):
        multinode.fetch(f"s3://{bucket}/stage/none", tmp_path / "n")


def test_dataref_fetch_refuses_changed_and_deleted_objects(tmp_path, bucket):
    import boto3

    from components import dataref
    s3 = boto3.client("s3")
    for name in ("x.png", "y.png"):
        s3.put_object(Bucket=bucket, Key=f"set/{name}", Body=name.encode())
    rows = [{"file": n, "etag": storage.info(f"s3://{bucket}/set/{n}")["etag"]} for n in ("x.png", "y.png")]
    dataref._fetch_s3(f"s3://{bucket}/set", rows, tmp_path / "a")
    assert read_tree(tmp_path / "a") == {"x.png": b"x.png", "y.png": b"y.png"}
    s3.put_object(Bucket=bucket, Key="set/x.png", Body=b"other")
    with pytest.raises(DataError, match=rf"s3://{bucket}/set/x\.png changed since this run prepared it "
                                        rf"\(ETag {rows[0]['etag']}\)"):
        dataref._fetch_s3(f"s3://{bucket}/set", rows, tmp_path / "b")
    s3.delete_object(Bucket=bucket, Key="set/y.png")
    with pytest.raises(DataError, match=rf"s3://{bucket}/set/y\.png was deleted since this run prepared it"):
        dataref._fetch_s3(f"s3://{bucket}/set", rows[1:], tmp_path / "c")

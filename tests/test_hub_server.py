"""The loopback Hub driven by real huggingface_hub client code: push, pull, revisions, auth, offline."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import huggingface_hub
import pytest
import transformers.utils.hub
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytest_plugins = ["hub_fixtures"]
# huggingface_hub's own LFS PUT passes `data=` to httpx2.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "org/tiny"


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def folder_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


FILES = {
    "notes.txt": b"a regular text file\n",
    "weights.safetensors": bytes(range(256)) * 8,  # LFS through the default .gitattributes
    "blob.dat": b"binary\0sample" * 10,  # LFS because the sample is binary
    "sub/dir/config.json": b'{"a": 1}',
}


def test_patches_every_cached_endpoint(local_hub):
    assert huggingface_hub.constants.ENDPOINT == local_hub.endpoint
    assert huggingface_hub.hf_api.api.endpoint == local_hub.endpoint
    assert transformers.utils.hub.hf_api().endpoint == local_hub.endpoint
    assert huggingface_hub.constants.HF_HUB_CACHE == str(local_hub.cache_dir)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", local_hub.endpoint)


def test_create_repo_conflict_and_exist_ok(local_hub):
    url = huggingface_hub.create_repo(REPO)
    assert url.repo_id == REPO and url.endpoint == local_hub.endpoint
    with pytest.raises(HfHubHTTPError) as err:
        huggingface_hub.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert huggingface_hub.create_repo(REPO, exist_ok=True).repo_id == REPO
    # A repo starts like on the Hub: one initial commit holding .gitattributes.
    info = HfApi().model_info(REPO)
    assert re.fullmatch(r"[0-9a-f]{40}", info.sha)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert huggingface_hub.create_repo("no-namespace").repo_id == "test-user/no-namespace"


def test_upload_regular_and_lfs_then_download_into_fresh_cache(local_hub, tmp_path):
    api = HfApi()
    api.create_repo(REPO)
    commit = api.upload_folder(repo_id=REPO, folder_path=write_folder(tmp_path / "src", FILES))
    assert re.fullmatch(r"[0-9a-f]{40}", commit.oid)

    stored = local_hub.server.files(REPO)
    lfs = {path for path, entry in stored.items() if entry.lfs_sha256 is not None}
    assert lfs == {"weights.safetensors", "blob.dat"}
    assert {path: local_hub.server.read(REPO, path) for path in FILES} == FILES
    # LFS bytes go to the signed CDN URL without the token; the batch call itself is authenticated.
    requests = local_hub.server.requests
    assert any(m == "POST" and p.endswith(".git/info/lfs/objects/batch") and auth for m, p, _, auth in requests)
    puts = [(p, auth) for m, p, _, auth in requests if m == "PUT"]
    assert len(puts) == 2 and not any(auth for _, auth in puts)

    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert set(tree) == {".gitattributes", "sub", "sub/dir", *FILES}
    assert tree["weights.safetensors"].lfs.sha256 == hashlib.sha256(FILES["weights.safetensors"]).hexdigest()

    snapshot = Path(huggingface_hub.snapshot_download(REPO))
    assert snapshot.is_relative_to(local_hub.cache_dir) and snapshot.name == commit.oid
    files = folder_files(snapshot)
    assert files.pop(".gitattributes").startswith(b"*.7z filter=lfs")
    assert files == FILES
    # The LFS downloads followed the 302 to the CDN and did not carry the token there.
    cdn_gets = [auth for m, p, s, auth in local_hub.server.requests if m == "GET" and p.startswith("/lfs/")]
    assert len(cdn_gets) == 2 and not any(cdn_gets)

    local_hub.fresh_cache()
    path = huggingface_hub.hf_hub_download(REPO, "sub/dir/config.json")
    assert Path(path).read_bytes() == FILES["sub/dir/config.json"]


def test_size_decides_lfs(local_hub, tmp_path):
    local_hub.server.state.lfs_size_threshold = 1000  # the Hub's is 10 MB: same rule, smaller file
    huggingface_hub.create_repo(REPO)
    huggingface_hub.upload_folder(
        repo_id=REPO, folder_path=write_folder(tmp_path, {"big.txt": b"x" * 1001, "small.txt": b"x" * 1000})
    )
    stored = local_hub.server.files(REPO)
    assert stored["big.txt"].lfs_sha256 is not None and stored["small.txt"].lfs_sha256 is None


def test_unchanged_files_make_no_commit(local_hub, tmp_path):
    """The preupload answer carries each file's remote oid; the client skips files whose oid it already has."""
    huggingface_hub.create_repo(REPO)
    folder = write_folder(tmp_path, FILES)
    first = huggingface_hub.upload_folder(repo_id=REPO, folder_path=folder).oid
    again = huggingface_hub.upload_folder(repo_id=REPO, folder_path=folder).oid
    assert again == first and len(local_hub.server.commit_ids(REPO)) == 2


def test_two_commits_give_two_revisions(local_hub):
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_file(repo_id=REPO, path_or_fileobj=b"v1" * 600, path_in_repo="model.bin").oid
    second = api.upload_file(repo_id=REPO, path_or_fileobj=b"v2" * 600, path_in_repo="model.bin").oid
    assert first != second
    assert local_hub.server.commit_ids(REPO)[1:] == [first, second]
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second, first]
    assert api.model_info(REPO).sha == second
    assert api.model_info(REPO, revision=first).sha == first

    assert Path(huggingface_hub.hf_hub_download(REPO, "model.bin", revision=first)).read_bytes() == b"v1" * 600
    assert Path(huggingface_hub.hf_hub_download(REPO, "model.bin")).read_bytes() == b"v2" * 600
    api.create_tag(REPO, tag="v1.0", revision=first)
    assert Path(huggingface_hub.hf_hub_download(REPO, "model.bin", revision="v1.0")).read_bytes() == b"v1" * 600
    api.create_branch(REPO, branch="dev", revision=first)
    api.upload_file(repo_id=REPO, path_or_fileobj=b"on dev", path_in_repo="dev.txt", revision="dev")
    assert "dev.txt" not in local_hub.server.files(REPO)
    assert local_hub.server.files(REPO, "dev")["model.bin"] == local_hub.server.files(REPO, first)["model.bin"]


def test_wrong_token_gets_401(local_hub):
    huggingface_hub.create_repo(REPO)
    with pytest.raises(HfHubHTTPError, match="Invalid credentials in Authorization header") as err:
        huggingface_hub.create_repo("org/other", token="hf_wrong")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as err:
        huggingface_hub.upload_file(repo_id=REPO, path_or_fileobj=b"x", path_in_repo="x.txt", token="hf_wrong")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError, match="must be authenticated") as err:
        huggingface_hub.upload_file(repo_id=REPO, path_or_fileobj=b"x", path_in_repo="x.txt", token=False)
    assert err.value.response.status_code == 401
    assert len(local_hub.server.commit_ids(REPO)) == 1


def test_missing_repo_revision_and_file(local_hub):
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/missing")
    huggingface_hub.create_repo(REPO)
    with pytest.raises(RevisionNotFoundError):
        huggingface_hub.hf_hub_download(REPO, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        huggingface_hub.hf_hub_download(REPO, "missing.json")
    # The 404 carried X-Repo-Commit, so the client cached the file's absence under that commit.
    sha = HfApi().model_info(REPO).sha
    assert (local_hub.cache_dir / "models--org--tiny" / ".no_exist" / sha / "missing.json").exists()


def test_offline_mode_loads_from_cache(local_hub, tmp_path):
    huggingface_hub.create_repo(REPO)
    huggingface_hub.upload_folder(repo_id=REPO, folder_path=write_folder(tmp_path, FILES))
    online = huggingface_hub.snapshot_download(REPO)
    refs_main = (local_hub.cache_dir / "models--org--tiny" / "refs" / "main").read_text()
    assert re.fullmatch(r"[0-9a-f]{40}", refs_main)

    answered = len(local_hub.server.requests)
    local_hub.set_offline()
    assert huggingface_hub.snapshot_download(REPO) == online
    assert (
        Path(huggingface_hub.hf_hub_download(REPO, "weights.safetensors")).read_bytes() == FILES["weights.safetensors"]
    )
    with pytest.raises(LocalEntryNotFoundError):
        huggingface_hub.hf_hub_download(REPO, "never-downloaded.txt")
    assert len(local_hub.server.requests) == answered


def test_commit_api_rejects_unknown_lfs_object(local_hub):
    """An lfsFile line whose object was never uploaded is refused, not committed as a dangling pointer."""
    api = HfApi()
    api.create_repo(REPO)
    op = CommitOperationAdd(path_in_repo="w.safetensors", path_or_fileobj=b"weights")
    api.preupload_lfs_files(REPO, additions=[op])
    local_hub.server.state.lfs_objects.clear()
    with pytest.raises(HfHubHTTPError, match="was not uploaded") as err:
        api.create_commit(REPO, operations=[op], commit_message="dangling")
    assert err.value.response.status_code == 422


def test_private_repo_needs_the_token(local_hub):
    huggingface_hub.create_repo(REPO, private=True)
    assert HfApi().model_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(REPO, token=False)
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download(REPO, ".gitattributes", token=False)


def test_checksums_match_and_catch_a_corrupted_download(local_hub, tmp_path):
    """Tree oids are the client's git-sha1 / sha256: a clean download verifies, a same-size corruption does not."""
    huggingface_hub.create_repo(REPO)
    huggingface_hub.upload_folder(repo_id=REPO, folder_path=write_folder(tmp_path, FILES))
    huggingface_hub.snapshot_download(REPO)
    clean = HfApi().verify_repo_checksums(REPO, cache_dir=local_hub.cache_dir)
    assert clean.checked_count == len(FILES) + 1 and not clean.mismatches and not clean.missing_paths

    good = FILES["weights.safetensors"]
    local_hub.server.corrupt_lfs_object(REPO, "weights.safetensors", bytes([good[0] ^ 1]) + good[1:])
    local_hub.fresh_cache()
    path = huggingface_hub.hf_hub_download(REPO, "weights.safetensors")  # the size matches: no error here
    assert Path(path).read_bytes() != good
    huggingface_hub.snapshot_download(REPO)
    corrupted = HfApi().verify_repo_checksums(REPO, cache_dir=local_hub.cache_dir)
    assert [m["path"] for m in corrupted.mismatches] == ["weights.safetensors"]

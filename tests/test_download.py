"""The download stage against a real HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import pytest
from omegaconf import OmegaConf

from conftest import kaggle_zip
from dlilabs import download as stage
from dlilabs.core import httpfetch
from dlilabs.ground.config import PACKAGE_ROOT
from dlilabs.ground.errors import UserError
from dlilabs.tracking.postgres import free_port


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kaggle_csv(rows: int, seed: int) -> bytes:
    """A tiny Sign-Language-MNIST-style CSV with Kaggle's CRLF line endings."""
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    lines = [header] + [
        ",".join(str(v) for v in [row % 25, *((row * 31 + i * seed) % 256 for i in range(784))])
        for row in range(rows)
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


TRAIN, TEST = kaggle_csv(5, 3), kaggle_csv(3, 7)
NPZ = b"PK fake npz bytes" * 100
ASL_FILES = {"sign_mnist_train.csv": [sha(TRAIN)], "sign_mnist_test.csv": [sha(TEST)]}


@pytest.fixture
def silent_url():
    """A URL whose server accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/mnist.npz"


@pytest.fixture
def closed_url():
    """A URL on a local port nobody listens on: connection refused at once."""
    return f"http://127.0.0.1:{free_port()}/mnist.npz"


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(httpfetch, "BACKOFF_S", 0.01)


def make_cfg(tmp_path, files, mirrors=(), local=None, timeout=10, retries=2, **source):
    """The slice of the composed config the stage reads, with the defaults of conf/dataset;
    `source` adds keys such as search=[folders] or accept_unverified=True."""
    source = {"local": local, "mirrors": list(mirrors), "files": files, **source}
    return OmegaConf.create(
        {
            "dataset": {
                "name": "toy",
                "source": {**source, "timeout": timeout, "retries": retries},
            },
            "paths": {"raw_dir": str(tmp_path / "raw"), "downloads_dir": str(tmp_path / "dl")},
        }
    )


def raw_files(tmp_path) -> list[str]:
    """Everything in raw_dir, hidden temporaries included."""
    raw = tmp_path / "raw"
    return sorted(str(p.relative_to(raw)) for p in raw.rglob("*")) if raw.exists() else []


# --- downloads that work ---------------------------------------------------------------


def test_single_file(server, tmp_path):
    server.routes["/mnist.npz"] = [(200, NPZ, "ok")]
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": server.url("/mnist.npz")}])
    assert stage.download(cfg) == {"mnist.npz": sha(NPZ)}
    assert (tmp_path / "raw" / "mnist.npz").read_bytes() == NPZ
    assert raw_files(tmp_path) == ["mnist.npz", "provenance.json"]


def test_zip_archive_with_crlf_csvs_in_sub_folders(server, tmp_path):
    server.routes["/asl.zip"] = [(200, kaggle_zip(TRAIN, TEST), "ok")]
    cfg = make_cfg(tmp_path, ASL_FILES, [{"url": server.url("/asl.zip"), "archive": "zip"}])
    assert stage.download(cfg) == {name: hashes[0] for name, hashes in ASL_FILES.items()}
    assert (tmp_path / "raw" / "sign_mnist_train.csv").read_bytes() == TRAIN
    assert b"\r\n" in (tmp_path / "raw" / "sign_mnist_test.csv").read_bytes()
    assert raw_files(tmp_path) == ["provenance.json", "sign_mnist_test.csv", "sign_mnist_train.csv"]


def test_per_file_mirror(server, tmp_path):
    server.routes.update({"/train.csv": [(200, TRAIN, "ok")], "/test.csv": [(200, TEST, "ok")]})
    mirror = {"files": {"sign_mnist_train.csv": server.url("/train.csv"),
                        "sign_mnist_test.csv": server.url("/test.csv")}}  # fmt: skip
    assert set(stage.download(make_cfg(tmp_path, ASL_FILES, [mirror]))) == set(ASL_FILES)


def test_verified_file_is_not_downloaded_again(server, tmp_path, caplog):
    server.routes["/mnist.npz"] = [(200, NPZ, "ok")]
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": server.url("/mnist.npz")}])
    stage.download(cfg)
    with caplog.at_level(logging.INFO, logger="dlilabs"):
        assert stage.download(cfg) == {"mnist.npz": sha(NPZ)}
    assert server.hits == ["/mnist.npz"]
    assert "already present, verified" in caplog.text


def test_corrupt_file_in_place_is_fetched_again(server, tmp_path):
    server.routes["/mnist.npz"] = [(200, NPZ, "ok")]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "mnist.npz").write_bytes(b"truncated")
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": server.url("/mnist.npz")}])
    assert stage.download(cfg) == {"mnist.npz": sha(NPZ)}
    assert (tmp_path / "raw" / "mnist.npz").read_bytes() == NPZ


def test_404_falls_back_to_next_mirror(server, tmp_path):
    server.routes["/good.npz"] = [(200, NPZ, "ok")]
    mirrors = [{"url": server.url("/gone.npz")}, {"url": server.url("/good.npz")}]
    assert stage.download(make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, mirrors))
    assert server.hits == ["/gone.npz", "/good.npz"]  # a 404 is not retried


def test_server_error_is_retried(server, tmp_path, fast_backoff):
    server.routes["/mnist.npz"] = [(503, b"busy", "ok"), (200, NPZ, "ok")]
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": server.url("/mnist.npz")}])
    assert stage.download(cfg) == {"mnist.npz": sha(NPZ)}
    assert server.hits == ["/mnist.npz", "/mnist.npz"]


# --- downloads that fail -----------------------------------------------------------------


def test_checksum_mismatch_deletes_the_file_and_names_the_hashes(server, tmp_path):
    server.routes["/mnist.npz"] = [(200, b"not mnist", "ok")]
    expected = [sha(NPZ), "0" * 64]
    cfg = make_cfg(tmp_path, {"mnist.npz": expected}, [{"url": server.url("/mnist.npz")}])
    with pytest.raises(UserError) as caught:
        stage.download(cfg)
    message = str(caught.value)
    assert "mnist.npz" in message and "checksum mismatch" in message
    assert all(digest in message for digest in expected)
    assert sha(b"not mnist") in message
    assert raw_files(tmp_path) == []


def test_transfer_cut_short(server, tmp_path, fast_backoff):
    server.routes["/mnist.npz"] = [(200, NPZ[:500], "cut")]
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": server.url("/mnist.npz")}])
    with pytest.raises(UserError, match="cut short"):
        stage.download(cfg)
    assert len(server.hits) == 3  # retries: 2
    assert raw_files(tmp_path) == []


def test_silent_server_hits_the_read_timeout_within_10_s(silent_url, tmp_path):
    # The default config (timeout 10, retries 2) and two mirrors that never answer.
    mirrors = [{"url": silent_url}, {"url": silent_url.replace("mnist", "copy")}]
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, mirrors)
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        stage.download(cfg)
    assert time.monotonic() - started < 10
    assert "no data" in str(caught.value)
    assert all(m["url"] in str(caught.value) for m in mirrors)  # each had its share


def test_unreachable_host_fails_fast_with_ways_forward(closed_url, tmp_path):
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": closed_url}])
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        stage.download(cfg)
    assert time.monotonic() - started < 5  # the backoff pauses only, no timeout
    message = str(caught.value)
    assert f"{closed_url}: cannot connect" in message
    assert "dataset.source.local=" in message and "make demo" in message
    assert raw_files(tmp_path) == []


def test_dataset_without_source(tmp_path):
    cfg = OmegaConf.create({"dataset": {"name": "line"}, "paths": {"raw_dir": str(tmp_path)}})
    with pytest.raises(UserError, match="nothing to download"):
        stage.download(cfg)


# --- the local override ------------------------------------------------------------------


def test_local_file(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "mnist.npz").write_bytes(NPZ)
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, local=str(tmp_path / "mine/mnist.npz"))
    assert stage.download(cfg) == {"mnist.npz": sha(NPZ)}
    assert (tmp_path / "raw" / "mnist.npz").read_bytes() == NPZ


def test_local_file_under_another_name(tmp_path):
    (tmp_path / "mnist (1).npz").write_bytes(NPZ)  # a browser's second download
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, local=str(tmp_path / "mnist (1).npz"))
    assert stage.download(cfg) == {"mnist.npz": sha(NPZ)}


def test_local_zip(tmp_path):
    # The top-level train copy is damaged: the one in the sub-folder is used instead.
    (tmp_path / "archive.zip").write_bytes(kaggle_zip(TRAIN, TEST, top_train=TRAIN[:-100]))
    cfg = make_cfg(tmp_path, ASL_FILES, local=str(tmp_path / "archive.zip"))
    assert set(stage.download(cfg)) == set(ASL_FILES)
    assert raw_files(tmp_path) == ["provenance.json", "sign_mnist_test.csv", "sign_mnist_train.csv"]


@pytest.mark.parametrize("layout", ["files", "zip"])
def test_local_folder(tmp_path, layout):
    folder = tmp_path / "downloads" / "nested"
    folder.mkdir(parents=True)
    if layout == "files":
        (folder / "sign_mnist_train.csv").write_bytes(TRAIN)
        (folder / "sign_mnist_test.csv").write_bytes(TEST)
    else:
        (folder / "sign-language-mnist.zip").write_bytes(kaggle_zip(TRAIN, TEST))
    cfg = make_cfg(tmp_path, ASL_FILES, local=str(tmp_path / "downloads"))
    assert stage.download(cfg) == {name: hashes[0] for name, hashes in ASL_FILES.items()}


def test_local_path_missing(tmp_path):
    cfg = make_cfg(tmp_path, ASL_FILES, local=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=re.escape(f"local={tmp_path / 'nowhere'}: no such file")):
        stage.download(cfg)


def test_local_folder_lacking_a_file(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "sign_mnist_train.csv").write_bytes(TRAIN)
    cfg = make_cfg(tmp_path, ASL_FILES, local=str(tmp_path / "half"))
    with pytest.raises(
        UserError, match=re.escape(f"local={tmp_path / 'half'}: no sign_mnist_test.csv")
    ):
        stage.download(cfg)


def test_local_file_with_wrong_hash(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"something else")
    cfg = make_cfg(tmp_path, {"mnist.npz": [sha(NPZ)]}, local=str(tmp_path / "mnist.npz"))
    with pytest.raises(UserError, match=f"expected sha256 {sha(NPZ)}"):
        stage.download(cfg)
    assert raw_files(tmp_path) == []


# --- all or nothing (issue 8) ------------------------------------------------------------


def half_zip() -> bytes:
    """A Kaggle-style zip that lacks the test CSV."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("sign_mnist_train/sign_mnist_train.csv", TRAIN)
    return buffer.getvalue()


def test_local_zip_lacking_a_file_installs_nothing(tmp_path):
    (tmp_path / "archive.zip").write_bytes(half_zip())
    cfg = make_cfg(tmp_path, ASL_FILES, local=str(tmp_path / "archive.zip"))
    with pytest.raises(UserError, match="no sign_mnist_test.csv there"):
        stage.download(cfg)
    assert raw_files(tmp_path) == []  # the good train CSV waited, and was dropped
    assert [p.name for p in tmp_path.iterdir()] == ["archive.zip"]  # no staging left behind


def test_mirror_zip_lacking_a_file_installs_nothing(server, tmp_path):
    server.routes["/asl.zip"] = [(200, half_zip(), "ok")]
    cfg = make_cfg(tmp_path, ASL_FILES, [{"url": server.url("/asl.zip"), "archive": "zip"}])
    with pytest.raises(UserError, match="no sign_mnist_test.csv there"):
        stage.download(cfg)
    assert raw_files(tmp_path) == []


# --- files the user already has: the downloads folder and other tools' caches -----------


def provenance(tmp_path) -> dict:
    return json.loads((tmp_path / "raw" / "provenance.json").read_text())


@pytest.mark.parametrize("layout", ["archive.zip", "csvs"])
def test_downloads_folder_comes_before_the_network(tmp_path, closed_url, caplog, layout):
    downloads = tmp_path / "dl"
    downloads.mkdir()
    if layout == "csvs":
        (downloads / "sign_mnist_train.csv").write_bytes(TRAIN)
        (downloads / "sign_mnist_test.csv").write_bytes(TEST)
    else:
        (downloads / "archive.zip").write_bytes(kaggle_zip(TRAIN, TEST))
    mirrors = [{"url": closed_url, "archive": "zip"}]  # never asked
    cfg = make_cfg(tmp_path, ASL_FILES, mirrors, search=[str(downloads), str(tmp_path / "none")])
    with caplog.at_level(logging.INFO, logger="dlilabs"):
        assert set(stage.download(cfg)) == set(ASL_FILES)
    where = {
        "csvs": str(downloads / "sign_mnist_train.csv"),
        "archive.zip": f"{downloads / 'archive.zip'}:sign_mnist_train.csv",
    }[layout]
    # One log line per file, saying where it came from; the same in provenance.json.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sign_mnist")]
    assert len(lines) == 2 and f"verified (from {where})" in "\n".join(lines)
    record = provenance(tmp_path)
    assert record["verified"] is True
    assert record["files"]["sign_mnist_train.csv"] == {
        "sha256": sha(TRAIN), "source": where, "verified": True,
    }  # fmt: skip


def test_kagglehub_cache_layout(tmp_path, closed_url):
    # kagglehub.dataset_download() leaves the extracted files in
    # $KAGGLEHUB_CACHE/datasets/<owner>/<dataset>/versions/<n>/ (kagglehub 1.0 cache.py).
    version = tmp_path / "kh/datasets/datamunge/sign-language-mnist/versions/1"
    (version / "sign_mnist_train").mkdir(parents=True)
    (version / "sign_mnist_test").mkdir()
    (version / "sign_mnist_train/sign_mnist_train.csv").write_bytes(TRAIN)
    (version / "sign_mnist_test/sign_mnist_test.csv").write_bytes(TEST)
    cfg = compose_dataset(tmp_path, "asl", KAGGLEHUB_CACHE=str(tmp_path / "kh"))
    cfg.dataset.source.files = ASL_FILES
    cfg.dataset.source.mirrors = [{"url": closed_url, "archive": "zip"}]
    assert set(stage.download(cfg)) == set(ASL_FILES)
    assert (
        "versions/1/sign_mnist_test/"
        in provenance(tmp_path)["files"]["sign_mnist_test.csv"]["source"]
    )


def test_keras_cache(tmp_path, closed_url):
    (tmp_path / "keras/datasets").mkdir(parents=True)
    (tmp_path / "keras/datasets/mnist.npz").write_bytes(NPZ)
    cfg = compose_dataset(tmp_path, "mnist", KERAS_HOME=str(tmp_path / "keras"))
    cfg.dataset.source.files = {"mnist.npz": [sha(NPZ)]}
    cfg.dataset.source.mirrors = [{"url": closed_url}]
    assert stage.download(cfg) == {"mnist.npz": sha(NPZ)}
    assert provenance(tmp_path)["files"]["mnist.npz"]["source"] == str(
        tmp_path / "keras/datasets/mnist.npz"
    )


def compose_dataset(tmp_path, dataset: str, **env: str):
    """The real composed config of `dataset` (its search folders), project at tmp_path/project,
    raw_dir at tmp_path/raw, with `env` set while resolving."""
    from dlilabs.ground.config import compose

    shutil.copytree(PACKAGE_ROOT / "conf", tmp_path / "project" / "conf", dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DLILABS_ROOT", str(tmp_path / "project"))
        for name in ("DLILABS_DOWNLOADS", "KERAS_HOME", "KAGGLEHUB_CACHE"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        cfg = compose([f"dataset={dataset}", f"paths.raw_dir={tmp_path / 'raw'}"])
        OmegaConf.resolve(cfg)
    return cfg


def test_mismatching_copy_is_refused_with_the_override_named(tmp_path, closed_url):
    downloads = tmp_path / "dl"
    downloads.mkdir()
    (downloads / "mnist.npz").write_bytes(b"a re-packed npz")
    cfg = make_cfg(
        tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": closed_url}], search=[str(downloads)]
    )
    with pytest.raises(UserError) as caught:
        stage.download(cfg)
    message = str(caught.value)
    assert f"refused: mnist.npz from {downloads / 'mnist.npz'}: checksum mismatch" in message
    assert "dataset.source.accept_unverified=true" in message
    assert "DLILABS_ACCEPT_UNVERIFIED=1 dvc repro" in message
    assert raw_files(tmp_path) == []
    # Ways forward: the downloads folder first.
    assert message.split("Ways forward:\n")[1].startswith(
        f"  1. put mnist.npz in the downloads folder {downloads}"
    )


def test_mismatching_copy_accepted_deliberately_is_recorded_unverified(
    tmp_path, closed_url, caplog
):
    downloads = tmp_path / "dl"
    downloads.mkdir()
    (downloads / "mnist.npz").write_bytes(b"a re-packed npz")
    cfg = make_cfg(
        tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": closed_url}], search=[str(downloads)],
        accept_unverified="true",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="dlilabs"):
        assert stage.download(cfg) == {"mnist.npz": sha(b"a re-packed npz")}
    assert "UNVERIFIED" in caplog.text
    assert provenance(tmp_path) == {
        "verified": False,
        "files": {"mnist.npz": {"sha256": sha(b"a re-packed npz"),
                                "source": str(downloads / "mnist.npz"), "verified": False}},
    }  # fmt: skip
    # Run again: the accepted copy stays (and stays unverified); without the override it goes.
    assert stage.download(cfg) == {"mnist.npz": sha(b"a re-packed npz")}
    assert provenance(tmp_path)["verified"] is False
    cfg.dataset.source.accept_unverified = False
    (downloads / "mnist.npz").unlink()
    with pytest.raises(UserError, match="could not get mnist.npz"):
        stage.download(cfg)
    assert not (tmp_path / "raw" / "mnist.npz").exists()


def test_a_verified_copy_wins_over_a_mismatching_one(tmp_path, closed_url):
    (tmp_path / "dl" / "old").mkdir(parents=True)
    (tmp_path / "dl" / "mnist.npz").write_bytes(b"another mirror's copy")
    (tmp_path / "dl" / "old" / "mnist.npz").write_bytes(NPZ)
    cfg = make_cfg(
        tmp_path, {"mnist.npz": [sha(NPZ)]}, [{"url": closed_url}], search=[str(tmp_path / "dl")],
        accept_unverified=True,
    )  # fmt: skip
    assert stage.download(cfg) == {"mnist.npz": sha(NPZ)}
    assert provenance(tmp_path)["verified"] is True


# --- the real entry point ----------------------------------------------------------------


def test_entry_point_offline(tmp_path, closed_url):
    project = tmp_path / "project"
    shutil.copytree(PACKAGE_ROOT / "conf", project / "conf")
    command = [
        sys.executable, "-m", "dlilabs.download", "dataset=mnist",
        f"dataset.source.mirrors=[{{url:{closed_url}}}]",
    ]  # fmt: skip
    env = {**os.environ, "DLILABS_ROOT": str(project), "KERAS_HOME": str(tmp_path / "keras")}
    env.pop("DLILABS_DOWNLOADS", None)
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert closed_url in done.stderr
    # The first way forward is the project's downloads folder.
    assert "  1. put mnist.npz (https://" in done.stderr
    assert f"in the downloads folder {project / 'downloads'} " in done.stderr
    assert "dataset.source.local=" in done.stderr and "make demo" in done.stderr
    assert "Traceback" not in done.stderr
    raw_dir = project / "data" / "raw" / "mnist"
    assert not raw_dir.exists() or not any(raw_dir.iterdir())

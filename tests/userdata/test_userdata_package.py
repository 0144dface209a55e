"""The Lambda deployment package carries the instance side, and can render from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from chalicelib.userdata import BUNDLED_FILES, FILES_DIR

REPO = Path(__file__).resolve().parents[2]
CHALICE = Path(sys.executable).parent / "chalice"


def test_chalice_package_contains_the_user_data_files_and_renders_from_them(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    out = tmp_path / "package"
    subprocess.run(
        [str(CHALICE), "package", "--stage", "dev", str(out)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    unpacked = tmp_path / "lambda"
    with zipfile.ZipFile(out / "deployment.zip") as zf:
        zf.extractall(unpacked)
    # chalicelib/user_data/* are symlinks in the repository; chalice stores their
    # targets' content, so the zip holds the real files.
    for name in ("cloud-init.sh", *BUNDLED_FILES):
        packed = unpacked / "chalicelib" / "user_data" / name
        assert not packed.is_symlink()
        assert packed.read_bytes() == (REPO / "user_data" / name).read_bytes()
    assert FILES_DIR.resolve() == (REPO / "chalicelib" / "user_data").resolve()

    # And the packaged code renders user data with nothing but the package on its path.
    probe = (
        "import chalicelib.userdata as u\n"
        "from chalicelib.userdata import AgentParams, render_user_data\n"
        "print(u.__file__)\n"
        "p = AgentParams(job_id='j', attempt=1, api_url='https://api.example', secret='s',"
        " volume_id='vol-0abc', command=('true',))\n"
        "print(len(render_user_data(p)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=unpacked,
        capture_output=True,
        text=True,
        check=True,
    )
    where, size = done.stdout.split()
    assert Path(where).is_relative_to(unpacked)
    assert 0 < int(size) < 16 * 1024

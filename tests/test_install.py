"""What `pip install .` puts on a machine: the command and its man page.

Installs this checkout (no dependencies) under a temporary prefix, as pip would into a
virtualenv, and asks man-db for the page the way `man tokenpak` does: from PATH.
"""

import os
import pwd
import shutil
import subprocess
import sys

from conftest import REPO


def test_pip_install_ships_the_man_page_where_man_finds_it(tmp_path):
    prefix = tmp_path / "venv"
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--prefix",
            str(prefix), str(REPO)]
    # pip reads its index settings from the user's real home, which the suite hides
    pip_env = dict(os.environ, HOME=pwd.getpwuid(os.getuid()).pw_dir)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path), env=pip_env)
    assert done.returncode == 0, done.stdout + done.stderr
    page = prefix / "share" / "man" / "man1" / "tokenpak.1"
    assert page.read_bytes() == (REPO / "man" / "tokenpak.1").read_bytes()
    assert (prefix / "bin" / "tokenpak").exists()
    assert shutil.which("man"), "man-db is not installed: apt-get install man-db"
    env = dict(os.environ, PATH="%s:/usr/bin:/bin" % (prefix / "bin"))
    env.pop("MANPATH", None)
    found = subprocess.run(["man", "-w", "tokenpak"], env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert os.path.realpath(found.stdout.strip()) == os.path.realpath(str(page))

"""The installed package stands alone: ``pip install .`` (what ``make test`` does) gives a server
that runs from any directory, with the schemas shipped inside the package."""

import configparser
import json
import os
import re
import subprocess
import sys

from harness import ROOT, LineClient, wait_until


def installed_python(tmp_path, code):
    """Run ``code`` with this interpreter from a directory outside the source tree, so only the
    installed package can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_installed_package_carries_every_schema(tmp_path):
    result = installed_python(tmp_path, "import json, activitynet.schemas as s; "
                                        "print(json.dumps([str(s.schema_dir()), sorted(s.COMMANDS)]))")
    assert result.returncode == 0, result.stderr
    where, commands = json.loads(result.stdout)
    assert "site-packages" in where, f"not the installed copy: {where}"
    shipped = sorted(p.stem for p in (ROOT / "schemas").glob("*.json") if p.stem != "definitions")
    assert commands == shipped


def test_the_installed_server_serves_from_another_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen(
        [sys.executable, "-m", "activitynet.server", "-lp", "0", "-lh", "127.0.0.1", "--bind", "127.0.0.1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        secret_line = server.stdout.readline()
        assert secret_line.startswith("generated secret: "), secret_line
        port = None
        for line in server.stderr:
            match = re.search(r"listening on \S+:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "the server never said where it listens"
        client = LineClient(port)
        client.send({"command": "LOGIN", "username": "anonymous"})
        client.expect("LOGIN_SUCCESS")
        client.send({"command": "ACTIVITY_MESSAGE", "username": "anonymous", "activity": {"x": 1}})
        assert client.expect("ACTIVITY_BROADCAST")["activity"] == {"x": 1, "authenticated_user": "anonymous"}
        client.close()
    finally:
        server.terminate()
        wait_until(lambda: server.poll() is not None, message="the server to exit")
    assert server.returncode == 0


def test_the_installed_package_carries_the_monitor_page(tmp_path):
    code = ("import importlib.resources as r, json; import activitynet.web as w; "
            "print(json.dumps([str(r.files(w)), sorted(p.name for p in r.files(w).iterdir() "
            "if p.suffix in ('.html', '.css', '.js'))]))")
    result = installed_python(tmp_path, code)
    assert result.returncode == 0, result.stderr
    where, files = json.loads(result.stdout)
    assert "site-packages" in where, f"not the installed copy: {where}"
    assert files == ["index.html", "map.css", "map.js"]


def test_the_installed_client_runs_both_ways(tmp_path):
    """``python -m activitynet.client`` and the ``activitynet-client`` script, from the installed
    package (the client is a package of its own: library and terminal program)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = os.path.join(os.path.dirname(sys.executable), "activitynet-client")
    for argv in ([sys.executable, "-m", "activitynet.client", "--help"], [script, "--help"]):
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("activitynet client:") and "--servers" in result.stdout
    where = installed_python(tmp_path, "import activitynet.client as c; print(c.Client.__module__, c.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith("activitynet.client.library ") and "site-packages" in where.stdout


def test_make_reinstalls_when_any_shipped_file_changes():
    """The Makefile's SOURCES (what .venv's installed copy is rebuilt from) names every file of
    every package setup.cfg ships, so an edit never leaves a stale copy in .venv."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    packages = config["options"]["packages"].split()
    mapped = dict(line.split(" = ") for line in config["options"]["package_dir"].strip().splitlines())
    database = subprocess.run(["make", "-np"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    sources = set(re.search(r"^SOURCES := (.*)$", database, re.MULTILINE).group(1).split())
    shipped = {str(path.relative_to(ROOT))
               for package in packages
               for path in (ROOT / mapped.get(package, package.replace(".", "/"))).iterdir()
               if path.is_file() and path.suffix in (".py", ".json", ".html", ".css", ".js")}
    assert shipped - sources == set()

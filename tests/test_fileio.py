"""Atomic outputs: a failed or killed writer leaves the previous file whole; outputs that are inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_lab.errors import InputError
from cifar_lab.fileio import atomic_output, atomic_write_text, check_output


def test_a_failing_writer_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk went away")
    assert target.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_link_in_place_of_the_output_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    link = tmp_path / "metrics.json"
    link.symlink_to(victim)
    atomic_write_text(link, "new")
    assert victim.read_text() == "keep" and not link.is_symlink() and link.read_text() == "new"


@pytest.mark.slow
def test_kill_9_mid_write_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("previous")
    code = ("import signal, sys; from cifar_lab.fileio import atomic_output\n"
            f"with atomic_output({str(target)!r}) as tmp:\n"
            "    tmp.write_text('half'); print('writing', flush=True); signal.pause()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_text() == "previous"


def test_check_output_refuses_inputs_directories_and_files_as_folders(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "in.npy"
    source.write_bytes(b"x")
    for out, why in ((source, "destroy the input"), (tmp_path, "is a directory"),
                     (tmp_path / "in.npy" / "out.csv", "is a file, not a directory")):
        with pytest.raises(InputError, match=why):
            check_output(out, (source,))
    monkeypatch.chdir(tmp_path)  # a relative spelling of the same file
    with pytest.raises(InputError, match="destroy the input"):
        check_output("./in.npy", (source,))
    assert check_output(tmp_path / "new" / "out.csv", (source,)) == tmp_path / "new" / "out.csv"

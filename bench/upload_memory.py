"""Memory high-water mark of the API process while it receives `.npz` uploads: the largest allowed upload,
a deflated bomb (a few hundred KB that decompress to a gigabyte), and a file whose header claims a terabyte.

Each case runs against a fresh `bitsearch serve --workers 0` (SQLite) on loopback; the figure is the
process's peak resident set (`VmHWM` in /proc) after the upload minus before it. With `--code DIR` the same
cases run against another checkout (e.g. the code before the limits), for comparison.

    python bench/upload_memory.py [--mib 512] [--bomb-gib 1] [--code DIR] [--label NAME]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import machine, write_result  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _npy_header(shape, descr="|u1") -> bytes:
    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def make_files(folder: Path, mib: int, bomb_gib: float) -> dict[str, Path]:
    files = {}
    # 1. the largest allowed upload: a stored (uncompressed) uint8 image array just under the byte limit
    items = (mib * 1024**2 - 4096) // (32 * 32 * 3)
    p = folder / "largest.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z, z.open("x.npy", "w", force_zip64=True) as f:
        f.write(_npy_header((items, 32, 32, 3)))
        rng = np.random.default_rng(0)
        left = items * 32 * 32 * 3
        while left:
            n = min(left, 16 * 1024**2)
            f.write(rng.integers(0, 255, n, dtype=np.uint8).tobytes())
            left -= n
    files["largest allowed upload"] = p
    # 2. a deflated bomb: zeros that decompress to `bomb_gib` GiB (within the decompressed limits)
    p = folder / "bomb.npz"
    total = int(bomb_gib * 1024**3)
    items = total // (32 * 32 * 3)
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z, \
            z.open("x.npy", "w", force_zip64=True) as f:
        f.write(_npy_header((items, 32, 32, 3)))
        zeros = bytes(16 * 1024**2)
        left = items * 32 * 32 * 3
        while left:
            n = min(left, len(zeros))
            f.write(zeros[:n])
            left -= n
    files[f"deflated bomb ({bomb_gib:g} GiB of zeros)"] = p
    # 3. a header that claims a terabyte
    p = folder / "claims-1tb.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", _npy_header((1 << 20, 1 << 20)) + bytes(4096))
    files["header claiming 1 TiB"] = p
    return files


def run_case(code: Path, data: Path, path: Path, max_bytes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "BITSEARCH_DATA_DIR": str(data),
           "BITSEARCH_DATABASE_URL": f"sqlite:///{data / 'bench.db'}", "BITSEARCH_MAX_DATASET_BYTES": str(max_bytes)}
    env.pop("BITSEARCH_BROKER_URL", None)
    made = subprocess.run([sys.executable, "-m", "service.cli", "keys", "create", "--tenant", "bench"], env=env,
                          cwd=str(code), capture_output=True, text=True, check=True)
    key = [line for line in made.stdout.split() if line.startswith("bsk_")][-1]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "0"],
                            env=env, cwd=str(code), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("serve did not start")
            time.sleep(0.3)
        time.sleep(1.0)
        before = _hwm_kib(proc.pid)
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            r = httpx.post(f"{base}/datasets", files={"file": (path.name, f)},
                           headers={"Authorization": f"Bearer {key}"}, timeout=600)
        seconds = time.perf_counter() - t0
        after = _hwm_kib(proc.pid)
        detail = r.json().get("detail") if r.status_code >= 400 else r.json().get("info")
        return {"status": r.status_code, "file_mib": round(path.stat().st_size / 1024**2, 2),
                "rss_before_mib": round(before / 1024, 1), "peak_rise_mib": round((after - before) / 1024, 1),
                "seconds": round(seconds, 2), "answer": detail if isinstance(detail, (str, dict)) else str(detail)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="the upload limit of the run, and the largest file's size")
    ap.add_argument("--bomb-gib", type=float, default=1.0)
    ap.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--cases", default="", help="comma-separated case numbers to run (1-3); default all")
    args = ap.parse_args()
    out = {"machine": machine(), "label": args.label, "limit_mib": args.mib, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.mib, args.bomb_gib)
        chosen = {int(c) for c in args.cases.split(",") if c} or {1, 2, 3}
        for i, (name, path) in enumerate(files.items(), 1):
            if i not in chosen:
                continue
            data = Path(tmp) / f"data{i}"
            data.mkdir()
            res = run_case(args.code.resolve(), data, path, args.mib * 1024**2 + 1024**2)
            out["cases"][name] = res
            print(f"{args.label}: {name}: {json.dumps(res)}", flush=True)
    slug = args.label.replace(" ", "-")
    write_result(f"upload_memory-{slug}.json", json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

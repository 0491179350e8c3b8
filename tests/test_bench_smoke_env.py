"""bench/bench_env.py --smoke: the environment stage names the device and its memory, records which attention paths
run here with the exception's text for each that does not (packed crops must not fall back in silence), and
rewrites its file after every probe."""
import json

from helpers import load_bench

ATTENTION_PATHS = {"varlen_flash", "xformers", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math"}


def test_bench_env_smoke_records_the_attention_paths_as_it_goes(tmp_path, capsys, monkeypatch):
    bench = load_bench("bench_env")
    written, write_report = [], bench.write_report

    def noting_write(report, *args, **kwargs):
        written.append(set(report))
        return write_report(report, *args, **kwargs)

    monkeypatch.setattr(bench, "write_report", noting_write)
    out = tmp_path / "env.json"
    bench.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"].startswith("cpu") and saved["device_memory_gib"] > 0 and saved["complete"]
    paths = saved["attention_paths"]
    assert set(paths) == ATTENTION_PATHS
    assert paths["sdpa_math"] == {"usable": True, "error": None}
    # no CUDA here: variable-length flash attention does not run, and the record says why in the exception's words
    assert paths["varlen_flash"]["usable"] is False and "Error" in paths["varlen_flash"]["error"]
    assert all(path["usable"] == (path["error"] is None) for path in paths.values())
    printed = capsys.readouterr().out
    assert f"attention varlen_flash: not usable: {paths['varlen_flash']['error']}" in printed
    # one write per probe, each adding what it found: a stage cut off keeps the probes that finished
    firsts = [next(i for i, keys in enumerate(written) if key in keys)
              for key in ("c_compiler", "triton_launch", "attention_paths", "copy_bandwidth_gb_per_s", "matmul")]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)

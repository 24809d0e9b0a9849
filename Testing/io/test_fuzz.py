"""Property test over image headers: any NRRD/NIfTI a user may hand in gives exit 0 with a complete
output folder, or exit 1 with one line naming the problem and nothing written; never an internal
error (exit 3). Bounded (hypothesis: few examples, no deadline) to stay well under a minute."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from KneeSegLogic.commands.main import main
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.volume import Volume

spacing = st.sampled_from([0.0, -1.0, float("nan"), 1e-5, 0.5, 1.0, 3.0, 80.0])
size = st.integers(min_value=1, max_value=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(size, size, size),
    spacings=st.tuples(spacing, spacing, spacing),
    dtype=st.sampled_from(["int16", "uint8", "float32", "float64"]),
    echoes=st.sampled_from([1, 2, 4]),
    suffix=st.sampled_from([".nrrd", ".nii", ".nii.gz", ".mha"]),
    cut=st.sampled_from([None, 0.0, 0.3, 0.9, 0.999]),
    given_times=st.sampled_from([None, "10,20", "40,30,20,10", "10,20,30,40"]),
)
def test_header_fuzz_is_exit_0_or_1_never_3(
    tmp_path_factory, capsys, shape, spacings, dtype, echoes, suffix, cut, given_times
):
    tmp = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    array = (100 + 900 * rng.random(shape + ((echoes,) if echoes > 1 else ()))).astype(dtype)
    times = tuple(10.0 * (e + 1) for e in range(echoes)) if echoes > 1 else None
    # The writer refuses a non-positive spacing itself; write 1 mm and patch the header's bytes instead.
    safe = tuple(s if np.isfinite(s) and s > 0 else 1.0 for s in spacings)
    path = write_volume(Volume(array, safe, echo_times_ms=times), tmp / f"scan{suffix}", compress=False)
    if safe != spacings and suffix == ".nrrd":
        data = path.read_bytes()
        header, _, pixels = data.partition(b"\n\n")
        for axis, (old, new) in enumerate(zip(safe, spacings)):
            if old != new:
                vector = ["0", "0", "0"]
                vector[axis] = f"{old:g}"
                header = header.replace(
                    f"({','.join(vector)})".encode(),
                    f"({','.join(vector[:axis] + [f'{new:g}'] + vector[axis + 1 :])})".encode(),
                )
        path.write_bytes(header + b"\n\n" + pixels)
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    out = tmp / "OUT"
    argv = ["t2", str(path), "-o", str(out), "--device", "cpu"] + (["--echo-times", given_times] if given_times else [])
    capsys.readouterr()
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code in (0, 1), err
    if code == 0:
        assert (out / "results.json").is_file() and not (tmp / "OUT.partial").exists()
    else:
        assert len(err) == 1 and err[0].startswith("kneeseg t2: error: "), err
        assert not out.exists() and not (tmp / "OUT.partial").exists()

"""What a container or a batch system limits, delivered for real: a small /dev/shm (Docker's default is 64 MB; here a
tmpfs of 256 KB in a user namespace), a data loader worker that hangs (a read that never returns: a named pipe where
an image should be), and a process limit with more workers asked for than there are CPUs."""
import os
import subprocess
import sys

import pytest

from conftest import BASE, ROOT, one_line_error, run_main, user_namespaces_work

needs_namespaces = pytest.mark.skipif(not user_namespaces_work(), reason='a private /dev/shm or process limit needs '
                                      'unshare -Urm (user and mount namespaces), which this system does not allow')


def in_namespace(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(['unshare', '-Urm', 'bash', '-c', script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@needs_namespaces
def test_a_dev_shm_too_small_for_the_workers_is_refused_before_anything_is_written(tiny_data, tmp_path):
    """Without the check the workers fail to allocate shared memory in their feeder thread, stay alive, and the run
    waits for their batches forever."""
    train = (f'{sys.executable} train.py {" ".join(map(str, BASE))} --data-dir {tiny_data} --output {tmp_path}/run '
             f'--workers 2')
    result = in_namespace(f'mount -t tmpfs -o size=256k pgt-shm /dev/shm && exec {train}')
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line_error(result.stderr)
    assert line.startswith('error: /dev/shm has 0.2 MiB free, and 1 rank(s) x 2 loader workers x 2 batches of 32 '
                           'images need about 0.4 MiB there; give the container more (docker run --shm-size=8g'), line
    assert not (tmp_path / 'run').exists()


def test_a_worker_that_hangs_ends_the_run_with_one_line(tiny_data, tmp_path):
    data = tmp_path / 'data'
    subprocess.run(['cp', '-r', str(tiny_data), str(data)], check=True)
    os.mkfifo(data / 'train' / 'n00000003' / 'stuck.JPEG')  # opening it for reading waits for a writer forever
    result = run_main('train.py', *BASE, '--data-dir', data, '--output', tmp_path / 'run', '--workers', 2,
                      '--loader-timeout', 2)
    assert result.returncode == 1
    assert one_line_error(result.stderr) == (
        'error: DataLoader timed out after 2 seconds: a data loader worker died or hung (its own error, if it printed '
        'one, is above; in a container, a /dev/shm too small for the batches hangs them)')


@needs_namespaces
def test_more_workers_than_cpus_are_capped_with_a_warning(tiny_data, tmp_path):
    """--workers 1000 under a process limit: forking them would fail (BlockingIOError) after the run directory was
    made; capped at the CPUs the process may use, the run trains."""
    cpus = len(os.sched_getaffinity(0))
    result = in_namespace(f'ulimit -u 200 && exec {sys.executable} train.py {" ".join(map(str, BASE))} --data-dir '
                          f'{tiny_data} --output {tmp_path}/run --workers 1000 --epochs 1 --cooldown-epochs 0 '
                          f'--pgt-start-epoch 0')
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f'WARNING --workers 1000 is more than the {cpus} CPU(s) this process may use: {cpus} workers'
            in result.stderr)

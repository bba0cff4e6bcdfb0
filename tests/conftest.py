import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
# the repository root is on sys.path through pytest's `pythonpath` setting (pyproject.toml)


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data folder {SHARED_DATA} not present (it sits beside the project in CI)")
    return SHARED_DATA


# The slowest modules first (minutes each on 2 cores, from --durations runs): with `-n 2` (pytest-xdist;
# pyproject's `--dist loadgroup --no-loadscope-reorder`) work is handed out in this order, so the long parts
# start at once and the short ones fill in around them. Without -n only the order changes.
SLOW_FIRST = ("test_docs.py", "test_faults.py", "test_bioimageio.py", "test_fastpath.py", "test_packaging.py",
              "test_monailabel_security.py", "test_monailabel_app.py", "test_shipped_models.py", "test_fnet_bundle.py",
              "test_spotlight_bundle.py", "test_first_run.py", "test_bad_inputs.py", "test_isl_cell_instance_bundle.py",
              "test_evaluation.py", "test_isl_nucleus_bundle.py", "test_omezarr.py", "test_unet3d_fucci_bundle.py")
# Modules whose tests share nothing (no module fixture): each test is a work unit of its own, so that their
# long tests (the docs run as written: minutes each) spread over both workers. Every other module is one
# unit (its module fixtures are built once, on one worker).
EACH_TEST_APART = ("test_docs.py",)
LONGEST_TESTS = ("test_bundle_readme_runs_as_written", "test_readme_demo_and_slow_commands")  # first in their module


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: (rank.get(os.path.basename(str(item.path)), len(rank)),
                                 getattr(item, "originalname", item.name) not in LONGEST_TESTS))  # stable otherwise
    for item in items:
        module = os.path.basename(str(item.path))
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.name if module in EACH_TEST_APART else module))


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # a worker of `-n N`: share the cores (torch here and every bundle subprocess) instead of each taking all
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, threads)

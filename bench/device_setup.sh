# Source on the device machine (H100): installs the carried wheels (.whl: optuna and its deps,
# flash-linear-attention 0.6.0) and momtune itself into /tmp/site, and puts them on PYTHONPATH.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null
export PYTHONPATH=/tmp/site
export PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1
cd /tmp && python3 -c "import momtune, torch, triton, optuna, fla; print('momtune', momtune.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'optuna', optuna.__version__, 'fla ok', torch.cuda.get_device_name())" && cd - >/dev/null
set +e

# Nothing is needed here: the plugin is loaded by its entry point once attention-verify is installed, and reads the
# implementations to verify from pyproject.toml ([tool.pytest.ini_options] attention_verify). Without the install,
# load it by name: `pytest -p harness.pytest_plugin` (harness/ on PYTHONPATH); never both (pytest refuses a plugin
# registered twice).

"""The YAML data shipped with edgetl, as packages so that importlib.resources finds them in a wheel,
an editable install and a checkout alike. The folders live at the top of the repository (``models/``,
``export/``, ``devices/``) and are mapped here by pyproject.toml; read them through
:mod:`edgetl.core.shipped`."""

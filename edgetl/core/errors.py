"""The one error hierarchy of the library. Only the CLI turns these into exit codes and messages."""


class EdgetlError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(EdgetlError):
    """An option, recipe or profile value is invalid."""


class DataError(EdgetlError):
    """A dataset folder or image cannot be used."""


class WeightsError(EdgetlError):
    """Pretrained weights cannot be found, or a weights file does not match its hash."""


class RunError(EdgetlError):
    """A run directory is missing, incomplete or inconsistent."""


class BundleError(EdgetlError):
    """A bundle is missing, malformed or tampered with."""


class ExportError(EdgetlError):
    """An exported variant failed its checks (parity or accuracy)."""


class BackendError(EdgetlError):
    """A runtime back-end (ONNX Runtime, OpenVINO) or a feature of it is not available."""


class OutputExistsError(EdgetlError):
    """The output path exists and replacing it was not asked for."""


class OutputBusyError(OutputExistsError):
    """Another edgetl command is writing the same output right now."""


class RemoteError(EdgetlError):
    """A device reached over SSH could not be used: connection, host key, login, or the command there failed."""

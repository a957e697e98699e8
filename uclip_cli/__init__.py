"""uclip: search your own photos in any language (uCLIP on ONNX Runtime).

uclip sends nothing anywhere. Importing the package switches off onnxruntime's telemetry before
onnxruntime can be imported through uclip: its official Linux builds otherwise write a persistent
device id under $XDG_CACHE_HOME/Microsoft/DeveloperTools at import and upload usage events.
ORT_DISABLE_TELEMETRY is the opt-out read at initialisation (onnxruntime >= 1.2x on Linux/macOS);
ORT_TELEMETRY_DISABLED is the name later releases also honour. A user's own setting is kept.
"""
import os

TELEMETRY_OPT_OUT = {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}

for _name, _value in TELEMETRY_OPT_OUT.items():
    os.environ.setdefault(_name, _value)

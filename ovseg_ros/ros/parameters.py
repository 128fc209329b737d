"""ROS parameters from the settings table: declared with descriptors, read back as one `Settings` object.

`ros2 param describe` shows each description, range and choices; rclpy enforces ranges and read-only; the
set-parameters callback checks the rest (choices, rules across settings) and refuses with a reason.
"""

from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.node import Node

from ..core.settings import SPEC_BY_NAME, SPECS, ParamSpec, Settings, make_settings, preset_defaults


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    text = spec.description + (f" (one of: {', '.join(spec.choices)})" if spec.choices else "")
    result = ParameterDescriptor(description=text, read_only=spec.read_only, dynamic_typing=spec.dynamic_typing)
    if spec.low is not None and not isinstance(spec.default, bool):
        if isinstance(spec.default, int):
            result.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
        elif isinstance(spec.default, float):
            result.floating_point_range = [FloatingPointRange(from_value=float(spec.low), to_value=float(spec.high),
                                                              step=0.0)]
    return result


def declare_settings(node: Node) -> str | None:
    """Declare every parameter, the preset's values as defaults (so values given explicitly override them).
    Returns the first problem with a given value (wrong type, out of range, not a choice): configure then fails
    with that one reason instead of a traceback."""
    problems: list[str] = []

    def declare(spec: ParamSpec, default):
        try:
            value = node.declare_parameter(spec.name, default, descriptor(spec)).value
        except ParameterException as exc:
            problems.append(f"parameter {spec.name}: {exc}")
            value = node.declare_parameter(spec.name, default, descriptor(spec), ignore_override=True).value
        reason = spec.check(plain(value))
        if reason:
            problems.append(reason)
        return value

    preset_spec = SPEC_BY_NAME["preset"]
    preset = declare(preset_spec, preset_spec.default)
    defaults = preset_defaults(preset if not preset_spec.check(preset) else preset_spec.default)
    for spec in SPECS:
        if spec.name != "preset":
            declare(spec, defaults[spec.name])
    return problems[0] if problems else None


def read_settings(node: Node) -> Settings:
    """The declared parameters as one checked Settings (ValueError with the reason)."""
    return make_settings({spec.name: plain(node.get_parameter(spec.name).value) for spec in SPECS})


def plain(value):
    """rclpy array parameter values (array.array, numpy) -> list; None -> [] (an empty array given at start-up,
    `-p cameras:=[]` or `[]` in a params file, arrives unset: an empty list has no type); others unchanged."""
    if value is None:
        return []
    return list(value) if hasattr(value, "tolist") or isinstance(value, (list, tuple)) else value

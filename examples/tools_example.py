"""Function tools for `oss-mlx chat --tools examples/tools_example.py`.

Every public function here becomes a tool: its signature and type hints give the JSON schema the
model sees, its docstring the descriptions (Google style "Args:" here; NumPy and reST work too).
The chat calls the function for real with the model's arguments and sends back what it returns
(a string as is, anything else as JSON). Raise an exception to report an error to the model.
"""

from __future__ import annotations

import datetime as _dt
import math
import random
from typing import Literal

# Made-up weather, so the example works offline and always gives the same answer.
_WEATHER = {
    "paris": ("sunny", 21),
    "london": ("light rain", 15),
    "tokyo": ("cloudy", 24),
    "new york": ("clear", 18),
}


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        city: The city's name, e.g. "Paris".
        unit: Temperature unit.
    """
    sky, celsius = _WEATHER.get(city.strip().lower(), ("partly cloudy", 19))
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "sky": sky, "temperature": temperature, "unit": unit}


def calculate(expression: str) -> float:
    """Evaluate an arithmetic expression exactly as Python would, e.g. "2 ** 10 / 3".

    Args:
        expression: Numbers, + - * / ** % // and parentheses, and the functions of Python's math
            module (sqrt, log, sin ...).
    """
    allowed = {name: getattr(math, name) for name in dir(math) if not name.startswith("_")}
    code = compile(expression, "<expression>", "eval")
    unknown = [name for name in code.co_names if name not in allowed]
    if unknown:
        raise ValueError(f"unknown names: {', '.join(unknown)}")
    return float(eval(code, {"__builtins__": {}}, allowed))


def current_time(timezone: str = "UTC") -> str:
    """The current date and time in an IANA time zone.

    Args:
        timezone: For example "Europe/Paris" or "America/New_York".
    """
    from zoneinfo import ZoneInfo

    return _dt.datetime.now(ZoneInfo(timezone)).isoformat(timespec="seconds")


def roll_dice(sides: int = 6, count: int = 1) -> list[int]:
    """Roll dice.

    Args:
        sides: Faces per die.
        count: How many dice.
    """
    if not 1 <= count <= 100 or sides < 2:
        raise ValueError("roll 1 to 100 dice of at least 2 sides")
    return [random.randint(1, sides) for _ in range(count)]

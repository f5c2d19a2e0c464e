"""Simulated sensors for the paper's scenarios: values a real device of each kind could report.

Each simulator is deterministic: built with a seed, `next(t_seconds)` returns the same sequence of
`(value, unit)` for the same sequence of times. Time is given by the caller (seconds since the
simulated midnight; the daily curves repeat every 86 400 s), randomness comes only from the
simulator's own `random.Random(seed)`: nothing here reads a clock or the global random generator.

    name          unit     value
    temperature   degC     diurnal curve (coldest 03:00, warmest 15:00) plus noise, -40..60
    humidity      %        moves opposite to temperature, plus noise, 0..100
    rain          mm/h     mostly 0; bursts of rain that start at random and decay, 0..200
    sun           W/m2     irradiance: a half sine between 06:00 and 18:00 dimmed by clouds, 0..1361
    rfid          move     an item moving between locations: {"item", "from", "to"}
    car           cars     a count at a junction: {"junction": "j1".."jN", "cars", "x", "y", "heading"}

The car value carries a text "junction" and a numeric "cars" because the analyser computes traffic
density per junction from exactly those two keys (node/services/analyser.py).
"""

from __future__ import annotations

import math
import random
from typing import Any, Protocol

DAY_SECONDS = 86_400.0
SOLAR_CONSTANT = 1361.0  # W/m2 at the top of the atmosphere: no ground reading can exceed it


class Simulator(Protocol):
    @property
    def unit(self) -> str | None: ...

    def next(self, t_seconds: float) -> tuple[Any, str | None]: ...


def _day_fraction(t_seconds: float) -> float:
    return (t_seconds % DAY_SECONDS) / DAY_SECONDS


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


class Temperature:
    """Air temperature: mean + amplitude * cos(2pi (hour - 15) / 24), Gaussian noise, rounded to 0.01."""

    unit = "degC"

    def __init__(self, seed: int = 0, *, mean: float = 15.0, amplitude: float = 6.0, noise: float = 0.3) -> None:
        self.random = random.Random(seed)
        self.mean, self.amplitude, self.noise = mean, amplitude, noise

    def baseline(self, t_seconds: float) -> float:
        # warmest at 15:00, coldest at 03:00: a cosine is close enough for a demonstration
        phase = 2 * math.pi * (_day_fraction(t_seconds) - 15 / 24)
        return self.mean + self.amplitude * math.cos(phase)

    def next(self, t_seconds: float) -> tuple[float, str]:
        value = self.baseline(t_seconds) + self.random.gauss(0.0, self.noise)
        return round(_clamp(value, -40.0, 60.0), 2), self.unit


class Humidity:
    """Relative humidity: high at night, low in the afternoon (opposite to temperature), plus noise."""

    unit = "%"

    def __init__(self, seed: int = 0, *, mean: float = 65.0, amplitude: float = 18.0, noise: float = 1.5) -> None:
        self.random = random.Random(seed)
        self.mean, self.amplitude, self.noise = mean, amplitude, noise

    def next(self, t_seconds: float) -> tuple[float, str]:
        phase = 2 * math.pi * (_day_fraction(t_seconds) - 15 / 24)
        value = self.mean - self.amplitude * math.cos(phase) + self.random.gauss(0.0, self.noise)
        return round(_clamp(value, 0.0, 100.0), 1), self.unit


class Rain:
    """Rain rate: dry spells, and bursts that start at random (about one an hour) and decay.

    A burst starts with a peak drawn from an exponential distribution (mean 8 mm/h) and decays with a
    half-life of 5 minutes; it ends below 0.1 mm/h. The chance of a start is per simulated second, so
    the process does not depend on how often it is sampled.
    """

    unit = "mm/h"
    BURSTS_PER_HOUR = 1.0
    HALF_LIFE_S = 300.0

    def __init__(self, seed: int = 0) -> None:
        self.random = random.Random(seed)
        self.rate = 0.0
        self.last_t: float | None = None

    def next(self, t_seconds: float) -> tuple[float, str]:
        elapsed = 0.0 if self.last_t is None else max(0.0, t_seconds - self.last_t)
        self.last_t = t_seconds
        self.rate *= 0.5 ** (elapsed / self.HALF_LIFE_S)
        if self.rate < 0.1:
            self.rate = 0.0
        start_chance = 1.0 - math.exp(-self.BURSTS_PER_HOUR * elapsed / 3600.0)
        if self.random.random() < start_chance:
            self.rate += self.random.expovariate(1 / 8.0)
        return round(_clamp(self.rate, 0.0, 200.0), 2), self.unit


class Sun:
    """Global irradiance: a half sine between sunrise (06:00) and sunset (18:00), dimmed by clouds.

    Cloud cover is a random walk in 0..0.8 that removes that fraction of the clear-sky value.
    """

    unit = "W/m2"

    def __init__(self, seed: int = 0, *, peak: float = 950.0) -> None:
        self.random = random.Random(seed)
        self.peak = peak
        self.cloud = self.random.uniform(0.0, 0.4)

    def next(self, t_seconds: float) -> tuple[float, str]:
        self.cloud = _clamp(self.cloud + self.random.gauss(0.0, 0.03), 0.0, 0.8)
        hour = _day_fraction(t_seconds) * 24
        clear = self.peak * math.sin(math.pi * (hour - 6) / 12) if 6 < hour < 18 else 0.0
        return round(_clamp(clear * (1 - self.cloud), 0.0, SOLAR_CONSTANT), 1), self.unit


class Rfid:
    """A reader's view of items moving between locations (the logistics scenario).

    Each reading is one item moving from where it is to a different location; every item starts
    at the first location.
    """

    unit = "move"
    LOCATIONS = ("dock", "warehouse", "truck", "shop")

    def __init__(self, seed: int = 0, *, items: int = 20, locations: tuple[str, ...] = LOCATIONS) -> None:
        if len(locations) < 2:
            raise ValueError("an RFID simulation needs at least two locations")
        self.random = random.Random(seed)
        self.locations = locations
        self.where = {f"item-{number:04d}": locations[0] for number in range(1, items + 1)}

    def next(self, t_seconds: float) -> tuple[dict[str, Any], str]:
        item = self.random.choice(sorted(self.where))
        source = self.where[item]
        target = self.random.choice([place for place in self.locations if place != source])
        self.where[item] = target
        return {"item": item, "from": source, "to": target}, self.unit


class Car:
    """Cars counted at junctions j1..jN of a grid town (the smart-city scenario).

    Junction k sits at (x, y) = (100 * ((k-1) % 4), 100 * ((k-1) // 4)) metres. Each reading is one
    junction's count: a rush-hour curve (peaks at 08:00 and 17:30) times a per-junction weight, with
    Poisson-like noise, and the heading (degrees, 0 = north) of the busiest approach.
    """

    unit = "cars"

    def __init__(self, seed: int = 0, *, junctions: int = 4, peak_cars: int = 40) -> None:
        if junctions < 1:
            raise ValueError("a car simulation needs at least one junction")
        self.random = random.Random(seed)
        self.junctions = junctions
        self.peak_cars = peak_cars
        self.weights = [self.random.uniform(0.5, 1.0) for _ in range(junctions)]

    def traffic(self, t_seconds: float) -> float:
        """The town's traffic level 0.1..1 at this time of day."""
        hour = _day_fraction(t_seconds) * 24
        morning = math.exp(-(((hour - 8.0) / 1.2) ** 2))
        evening = math.exp(-(((hour - 17.5) / 1.5) ** 2))
        return 0.1 + 0.9 * max(morning, evening)

    def next(self, t_seconds: float) -> tuple[dict[str, Any], str]:
        index = self.random.randrange(self.junctions)
        expected = self.peak_cars * self.weights[index] * self.traffic(t_seconds)
        cars = max(0, round(self.random.gauss(expected, math.sqrt(expected) + 0.5)))
        value = {
            "junction": f"j{index + 1}",
            "cars": int(cars),
            "x": 100.0 * (index % 4),
            "y": 100.0 * (index // 4),
            "heading": self.random.choice((0, 90, 180, 270)),
        }
        return value, self.unit


class SimulatorClass(Protocol):
    """What SIMULATORS holds: a class with the unit of its readings, built from a seed."""

    @property
    def unit(self) -> str | None: ...

    def __call__(self, seed: int = 0) -> Simulator: ...


# name -> class; each class's `unit` is the unit of its readings, and `cls(seed)` builds one.
SIMULATORS: dict[str, SimulatorClass] = {
    "temperature": Temperature,
    "humidity": Humidity,
    "rain": Rain,
    "sun": Sun,
    "rfid": Rfid,
    "car": Car,
}


def make_simulator(name: str, seed: int = 0) -> Simulator:
    """The simulator called `name` (a key of SIMULATORS), seeded with `seed`."""
    try:
        factory = SIMULATORS[name]
    except KeyError:
        raise ValueError(f"no simulator {name!r}; choose one of {', '.join(SIMULATORS)}") from None
    return factory(seed)

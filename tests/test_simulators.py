"""sensors/simulators.py: deterministic per seed, physically plausible, and in the shape services read.

Every simulator is sampled over whole simulated days (one sample a minute) and its values are
checked against physical bounds and the daily shape it claims; the car values are fed to the
analyser's own summary to show it finds a traffic density per junction in them.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from tomq.node.services.analyser import Sample, summarise
from tomq.node.services.readings import reading_body
from tomq.sensors.simulators import DAY_SECONDS, SIMULATORS, SOLAR_CONSTANT, Car, Rfid, make_simulator

MINUTE = 60.0


def day_of(name: str, seed: int = 1, days: int = 1) -> list[tuple[float, Any, str | None]]:
    simulator = make_simulator(name, seed)
    out = []
    for minute in range(int(days * DAY_SECONDS / MINUTE)):
        t = minute * MINUTE
        value, unit = simulator.next(t)
        out.append((t, value, unit))
    return out


def hour_of(t: float) -> float:
    return (t % DAY_SECONDS) / 3600


@pytest.mark.parametrize("name", sorted(SIMULATORS))
def test_same_seed_same_readings_other_seed_other_readings(name: str) -> None:
    first = day_of(name, seed=7)
    assert first == day_of(name, seed=7)
    assert first != day_of(name, seed=8)


@pytest.mark.parametrize("name", sorted(SIMULATORS))
def test_every_reading_is_a_valid_reading_body_with_the_registered_unit(name: str) -> None:
    for _, value, unit in day_of(name):
        assert unit == SIMULATORS[name].unit
        reading_body(value, unit)  # raises MalformedReading on anything a service would refuse


def test_registry_names_and_units() -> None:
    assert {name: cls.unit for name, cls in SIMULATORS.items()} == {
        "temperature": "degC", "humidity": "%", "rain": "mm/h", "sun": "W/m2", "rfid": "move", "car": "cars",
    }
    with pytest.raises(ValueError, match="no simulator 'snow'"):
        make_simulator("snow")


def test_temperature_is_plausible_and_warmer_in_the_afternoon() -> None:
    day = day_of("temperature")
    values = [value for _, value, _ in day]
    assert all(-40 <= v <= 60 for v in values)
    afternoon = [v for t, v, _ in day if 13 <= hour_of(t) < 17]
    night = [v for t, v, _ in day if 1 <= hour_of(t) < 5]
    assert min(afternoon) > max(night)
    assert 10 < sum(values) / len(values) < 20


def test_humidity_is_a_percentage_and_higher_at_night() -> None:
    day = day_of("humidity")
    assert all(0 <= v <= 100 for _, v, _ in day)
    afternoon = [v for t, v, _ in day if 13 <= hour_of(t) < 17]
    night = [v for t, v, _ in day if 1 <= hour_of(t) < 5]
    assert sum(night) / len(night) > sum(afternoon) / len(afternoon) + 10


def test_rain_is_mostly_dry_with_bursts() -> None:
    week = day_of("rain", days=7)
    values = [v for _, v, _ in week]
    assert all(0 <= v <= 200 for v in values)
    dry = sum(1 for v in values if v == 0)
    assert dry > len(values) / 2  # mostly dry
    starts = sum(1 for before, after in itertools.pairwise(values) if before == 0 and after > 0)
    assert starts >= 3  # about one burst an hour starts; some of them in a week, surely
    # a burst decays: the reading after a peak is lower unless another burst started
    assert any(a > b > 0 for a, b in itertools.pairwise(values))


def test_rain_does_not_depend_on_the_sampling_rate() -> None:
    # Burst starts are a per-second chance: sampling ten times as often must not rain ten times as much.
    hourly_starts = []
    for step in (60.0, 6.0):
        simulator = make_simulator("rain", 3)
        values = [simulator.next(i * step)[0] for i in range(int(10 * DAY_SECONDS / step))]
        starts = sum(1 for a, b in itertools.pairwise(values) if a == 0 and b > 0)
        hourly_starts.append(starts / (10 * 24))
    assert all(0.3 < rate < 2.0 for rate in hourly_starts), hourly_starts


def test_sun_is_dark_at_night_and_bright_at_noon() -> None:
    day = day_of("sun")
    assert all(0 <= v <= SOLAR_CONSTANT for _, v, _ in day)
    assert all(v == 0 for t, v, _ in day if hour_of(t) < 6 or hour_of(t) >= 18)
    noon = [v for t, v, _ in day if 11 <= hour_of(t) < 13]
    assert min(noon) > 100


def test_rfid_items_move_between_known_locations_consistently() -> None:
    simulator = Rfid(seed=4, items=5)
    where = dict.fromkeys(simulator.where, Rfid.LOCATIONS[0])
    for step in range(500):
        value, _ = simulator.next(step)
        assert set(value) == {"item", "from", "to"}
        assert value["from"] == where[value["item"]]  # an item leaves from where it last arrived
        assert value["to"] != value["from"] and value["to"] in Rfid.LOCATIONS
        where[value["item"]] = value["to"]
    assert len(set(where.values())) > 1


def test_car_values_carry_junction_and_cars_and_follow_rush_hour() -> None:
    day = day_of("car")
    for _, value, _ in day:
        assert re.fullmatch(r"j[1-4]", value["junction"])
        assert isinstance(value["cars"], int) and not isinstance(value["cars"], bool) and value["cars"] >= 0
        assert {"x", "y", "heading"} <= set(value)
        assert 0 <= value["heading"] < 360
    rush = [v["cars"] for t, v, _ in day if 7.5 <= hour_of(t) < 8.5]
    night = [v["cars"] for t, v, _ in day if 1 <= hour_of(t) < 4]
    assert sum(rush) / len(rush) > 3 * sum(night) / len(night)


def test_the_analyser_finds_traffic_density_per_junction_in_car_readings() -> None:
    simulator = Car(seed=2, junctions=3)
    samples = []
    for index in range(60):
        value, _ = simulator.next(8 * 3600 + index)
        samples.append(Sample(data=f"reading:{index}", time_ms=index * 1000, value=value))
    density = summarise(samples)["density"]
    assert set(density) == {"j1", "j2", "j3"}
    assert sum(entry["readings"] for entry in density.values()) == 60

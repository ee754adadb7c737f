//! Vivaldi network coordinates, as hashicorp/serf's `coordinate` package (which Consul uses):
//! an 8-dimensional Euclidean position plus a height (the access link) and an adjustment (a
//! windowed correction), all in seconds, and an error estimate. A node's [`Client`] moves its
//! own coordinate from each observed round-trip time to a peer and that peer's coordinate;
//! [`Coordinate::distance_to`] then estimates the round trip between any two nodes.
//!
//! Sans-IO: the caller measures the RTT and passes it in, and the random source (used only when
//! two coordinates sit on top of each other) is the caller's too. Numbers, formulas and defaults
//! follow serf's `coordinate/client.go`, `coordinate.go` and `config.go`.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// Two coordinates closer than this (seconds) are on top of each other.
const ZERO_THRESHOLD: f64 = 1.0e-6;

/// The largest round trip an update accepts (serf's `maxRTT`).
pub const MAX_RTT: Duration = Duration::from_secs(10);

/// Tuning of the algorithm; [`Config::default`] is serf's `DefaultConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Dimensions of the Euclidean part.
    pub dimensionality: usize,
    /// The largest (and initial) error.
    pub vivaldi_error_max: f64,
    /// Weight of a new sample in the error estimate (`ce`).
    pub vivaldi_ce: f64,
    /// Step size of a move (`cc`).
    pub vivaldi_cc: f64,
    /// Samples in the adjustment window (0: no adjustment).
    pub adjustment_window_size: usize,
    /// The smallest height, seconds.
    pub height_min: f64,
    /// RTT samples per peer in the moving median filter.
    pub latency_filter_size: usize,
    /// Gravity radius, seconds: pulls coordinates back to the origin against drift.
    pub gravity_rho: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dimensionality: 8,
            vivaldi_error_max: 1.5,
            vivaldi_ce: 0.25,
            vivaldi_cc: 0.25,
            adjustment_window_size: 20,
            height_min: 10.0e-6,
            latency_filter_size: 3,
            gravity_rho: 150.0,
        }
    }
}

/// A network coordinate; serialised with Consul's field names (`Vec`, `Error`, `Adjustment`,
/// `Height`), so it is also the JSON of `/v1/coordinate/*`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Coordinate {
    /// The Euclidean part, seconds.
    #[serde(rename = "Vec")]
    pub vec: Vec<f64>,
    /// Confidence in the coordinate (dimensionless; larger is worse).
    #[serde(rename = "Error")]
    pub error: f64,
    /// Offset added to distances, seconds.
    #[serde(rename = "Adjustment")]
    pub adjustment: f64,
    /// Non-Euclidean offset (the access link), seconds.
    #[serde(rename = "Height")]
    pub height: f64,
}

/// Why an update or a coordinate was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The two coordinates have a different number of dimensions.
    #[error("dimensions aren't compatible")]
    Dimensions,
    /// A component is NaN or infinite.
    #[error("coordinate is invalid")]
    Invalid,
    /// The round trip is negative or above [`MAX_RTT`].
    #[error("round trip time not in valid range, duration {0:?} is not a positive value less than 10s")]
    Rtt(Duration),
}

impl Coordinate {
    /// A coordinate at the origin with the config's initial error and height.
    pub fn new(config: &Config) -> Coordinate {
        Coordinate {
            vec: vec![0.0; config.dimensionality],
            error: config.vivaldi_error_max,
            adjustment: 0.0,
            height: config.height_min,
        }
    }

    /// Whether every component is finite.
    pub fn is_valid(&self) -> bool {
        self.vec.iter().all(|f| f.is_finite())
            && self.error.is_finite()
            && self.adjustment.is_finite()
            && self.height.is_finite()
    }

    /// Whether the two have the same dimensions.
    pub fn is_compatible_with(&self, other: &Coordinate) -> bool {
        self.vec.len() == other.vec.len()
    }

    /// The estimated round trip to `other`, seconds, with the adjustments (when they leave it
    /// positive). `None` when the dimensions differ.
    pub fn distance_to(&self, other: &Coordinate) -> Option<f64> {
        if !self.is_compatible_with(other) {
            return None;
        }
        let dist = self.raw_distance_to(other);
        let adjusted = dist + self.adjustment + other.adjustment;
        Some(if adjusted > 0.0 { adjusted } else { dist })
    }

    /// The Vivaldi distance without adjustments; dimensions already checked.
    fn raw_distance_to(&self, other: &Coordinate) -> f64 {
        magnitude(&diff(&self.vec, &other.vec)) + self.height + other.height
    }

    /// This coordinate moved by `force` away from `other` (towards it when negative);
    /// dimensions already checked.
    fn apply_force(&self, config: &Config, rng: &mut impl Rng, force: f64, other: &Coordinate) -> Coordinate {
        let mut ret = self.clone();
        let (unit, mag) = unit_vector_at(rng, &self.vec, &other.vec);
        for (r, u) in ret.vec.iter_mut().zip(&unit) {
            *r += u * force;
        }
        if mag > ZERO_THRESHOLD {
            ret.height = (ret.height + other.height) * force / mag + ret.height;
            ret.height = ret.height.max(config.height_min);
        }
        ret
    }
}

fn diff(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn magnitude(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// A unit vector pointing at `a` from `b`, and their distance; a random direction (and 0) when
/// they coincide.
fn unit_vector_at(rng: &mut impl Rng, a: &[f64], b: &[f64]) -> (Vec<f64>, f64) {
    let mut ret = diff(a, b);
    let mag = magnitude(&ret);
    if mag > ZERO_THRESHOLD {
        return (ret.iter().map(|x| x / mag).collect(), mag);
    }
    for r in ret.iter_mut() {
        *r = rng.random::<f64>() - 0.5;
    }
    let mag = magnitude(&ret);
    if mag > ZERO_THRESHOLD {
        return (ret.iter().map(|x| x / mag).collect(), 0.0);
    }
    let mut ret = vec![0.0; ret.len()];
    if let Some(first) = ret.first_mut() {
        *first = 1.0;
    }
    (ret, 0.0)
}

/// One node's estimate of its own coordinate, moved by its observations (serf's `Client`).
#[derive(Clone, Debug)]
pub struct Client {
    coord: Coordinate,
    origin: Coordinate,
    config: Config,
    adjustment_index: usize,
    adjustment_samples: Vec<f64>,
    latency_filter_samples: HashMap<String, Vec<f64>>,
    resets: u64,
}

impl Client {
    /// A client at the origin.
    pub fn new(config: Config) -> Client {
        Client {
            coord: Coordinate::new(&config),
            origin: Coordinate::new(&config),
            adjustment_index: 0,
            adjustment_samples: vec![0.0; config.adjustment_window_size],
            latency_filter_samples: HashMap::new(),
            resets: 0,
            config,
        }
    }

    /// The current coordinate.
    pub fn coordinate(&self) -> &Coordinate {
        &self.coord
    }

    /// Forces the coordinate to a known value.
    pub fn set_coordinate(&mut self, coord: Coordinate) -> Result<(), Error> {
        self.check(&coord)?;
        self.coord = coord;
        Ok(())
    }

    /// Forgets the RTT samples of `node` (it left).
    pub fn forget_node(&mut self, node: &str) {
        self.latency_filter_samples.remove(node);
    }

    /// How many times the coordinate went invalid and was reset to the origin.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// The estimated round trip from this client to `other`, seconds.
    pub fn distance_to(&self, other: &Coordinate) -> Option<f64> {
        self.coord.distance_to(other)
    }

    fn check(&self, coord: &Coordinate) -> Result<(), Error> {
        if !self.coord.is_compatible_with(coord) {
            return Err(Error::Dimensions);
        }
        if !coord.is_valid() {
            return Err(Error::Invalid);
        }
        Ok(())
    }

    /// Moving median of the last samples of `node`, with this one.
    fn latency_filter(&mut self, node: &str, rtt: f64) -> f64 {
        let size = self.config.latency_filter_size.max(1);
        let samples = self.latency_filter_samples.entry(node.to_owned()).or_default();
        samples.push(rtt);
        if samples.len() > size {
            samples.remove(0);
        }
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    fn update_vivaldi(&mut self, rng: &mut impl Rng, other: &Coordinate, rtt: f64) {
        let dist = self.coord.distance_to(other).unwrap_or(0.0);
        let rtt = rtt.max(ZERO_THRESHOLD);
        let wrongness = (dist - rtt).abs() / rtt;
        let total_error = (self.coord.error + other.error).max(ZERO_THRESHOLD);
        let weight = self.coord.error / total_error;
        let ce = self.config.vivaldi_ce;
        self.coord.error =
            (ce * weight * wrongness + self.coord.error * (1.0 - ce * weight)).min(self.config.vivaldi_error_max);
        let force = self.config.vivaldi_cc * weight * (rtt - dist);
        self.coord = self.coord.apply_force(&self.config, rng, force, other);
    }

    fn update_adjustment(&mut self, other: &Coordinate, rtt: f64) {
        let window = self.config.adjustment_window_size;
        if window == 0 {
            return;
        }
        // The current adjustments do not figure in: the raw distance.
        self.adjustment_samples[self.adjustment_index] = rtt - self.coord.raw_distance_to(other);
        self.adjustment_index = (self.adjustment_index + 1) % window;
        self.coord.adjustment = self.adjustment_samples.iter().sum::<f64>() / (2.0 * window as f64);
    }

    fn update_gravity(&mut self, rng: &mut impl Rng) {
        let dist = self.origin.distance_to(&self.coord).unwrap_or(0.0);
        let force = -(dist / self.config.gravity_rho).powi(2);
        let origin = self.origin.clone();
        self.coord = self.coord.apply_force(&self.config, rng, force, &origin);
    }

    /// Moves this client's coordinate from one observation: `rtt` to `node`, whose coordinate
    /// is `other`. Returns the new coordinate.
    pub fn update(
        &mut self,
        rng: &mut impl Rng,
        node: &str,
        other: &Coordinate,
        rtt: Duration,
    ) -> Result<&Coordinate, Error> {
        self.check(other)?;
        if rtt > MAX_RTT {
            return Err(Error::Rtt(rtt));
        }
        let rtt = self.latency_filter(node, rtt.as_secs_f64());
        self.update_vivaldi(rng, other, rtt);
        self.update_adjustment(other, rtt);
        self.update_gravity(rng);
        if !self.coord.is_valid() {
            self.resets += 1;
            self.coord = Coordinate::new(&self.config);
        }
        Ok(&self.coord)
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

#[cfg(test)]
mod tests;

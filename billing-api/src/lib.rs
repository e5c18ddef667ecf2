#![doc = include_str!("../README.md")]

pub mod adjust;
pub mod catalog;
pub mod invoice;
pub mod rating;
pub mod state;
pub mod usage;

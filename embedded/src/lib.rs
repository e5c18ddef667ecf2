#![doc = include_str!("../README.md")]

pub mod demo;
pub mod ingest;
pub mod secrets;
pub mod server;
pub mod transfer;

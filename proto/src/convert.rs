//! Conversions between wire types and the std types Census works with.

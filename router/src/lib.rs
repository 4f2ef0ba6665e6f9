//! corecast router.

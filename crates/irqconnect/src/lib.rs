//! Host-side paravirtual IoConnectInterrupt service.

#![forbid(unsafe_code)]

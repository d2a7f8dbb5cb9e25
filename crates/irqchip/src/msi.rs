//! MSI address/data encoding (SDM Vol. 3A 11.11).

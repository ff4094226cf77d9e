//! What a task costs: credits per image, by size.

use crate::error::{Error, Result};
use tollgate_contract::{ErrorCode, ImageSize};

/// Credits per image for each size; the contract's default is 1, 2 and 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub s256: u64,
    pub s512: u64,
    pub s1024: u64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            s256: 1,
            s512: 2,
            s1024: 4,
        }
    }
}

impl Prices {
    pub fn per_image(&self, size: ImageSize) -> u64 {
        match size {
            ImageSize::S256 => self.s256,
            ImageSize::S512 => self.s512,
            ImageSize::S1024 => self.s1024,
        }
    }

    /// The cost of `n` images of `size`.
    pub fn cost(&self, size: ImageSize, n: u8) -> Result<u64> {
        self.per_image(size)
            .checked_mul(u64::from(n))
            .ok_or_else(|| {
                Error::invalid(
                    ErrorCode::InvalidValue,
                    "n",
                    "The task would cost more credits than can be counted.",
                )
            })
    }

    /// Parses `256x256=1,512x512=2,1024x1024=4` (sizes left out keep their default).
    pub fn parse(text: &str) -> std::result::Result<Prices, String> {
        let mut prices = Prices::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (size, credits) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: write SIZE=CREDITS, like 512x512=2"))?;
            let size: ImageSize = size.trim().parse()?;
            let credits: u64 = credits
                .trim()
                .parse()
                .map_err(|_| format!("{pair:?}: the price must be a whole number of credits"))?;
            match size {
                ImageSize::S256 => prices.s256 = credits,
                ImageSize::S512 => prices.s512 = credits,
                ImageSize::S1024 => prices.s1024 = credits,
            }
        }
        Ok(prices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_defaults_and_parsing() {
        let p = Prices::default();
        assert_eq!(p.cost(ImageSize::S1024, 4).unwrap(), 16);
        let q = Prices::parse("256x256=3, 1024x1024=10").unwrap();
        assert_eq!((q.s256, q.s512, q.s1024), (3, 2, 10));
        assert!(Prices::parse("300x300=1").is_err());
        assert!(Prices::parse("512x512=two").is_err());
    }
}

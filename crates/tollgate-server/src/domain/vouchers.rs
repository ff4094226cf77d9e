//! Credit vouchers: single-use codes the operator issues and an account holder redeems for credits.
//!
//! A code is `tgv_` and 128 random bits, shown once to the operator and stored only as its hash,
//! like an API key. Redeeming is one store transaction: a guarded update marks the voucher used
//! (only if it is unused and unexpired) and credits the account with a `voucher` ledger entry, so
//! a code pays out once however many requests race for it.

use crate::domain::secrets;
use crate::domain::service::Tollgate;
use crate::error::{Error, Result, VoucherRefusal};
use crate::store::{from_millis, to_millis, RedeemOutcome, VoucherRecord};
use tollgate_contract::{Account, CreateVoucherRequest, CreatedVoucher, ErrorCode, List, Voucher};

/// The most a single voucher may be worth (a typo guard, not a business rule).
pub const MAX_VOUCHER_CREDITS: u64 = 1_000_000_000;
pub const MAX_NOTE_CHARS: usize = 500;
/// Codes are `tgv_` and 32 hex digits; anything much longer is not a code.
const MAX_CODE_CHARS: usize = 64;

/// A redeemed voucher: the account with its new balance and the credits the code added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub account: Account,
    pub credits: u64,
}

/// How a code typed by a person is read: surrounding spaces and letter case do not matter.
pub fn normalize_code(code: &str) -> String {
    code.trim().to_ascii_lowercase()
}

impl Tollgate {
    /// Operator: a new voucher worth `credits` (1 to [`MAX_VOUCHER_CREDITS`]), with an optional
    /// expiry in the future and a note. The code is in the answer and nowhere else.
    pub async fn create_voucher(&self, request: CreateVoucherRequest) -> Result<CreatedVoucher> {
        if !(1..=MAX_VOUCHER_CREDITS).contains(&request.credits) {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "credits",
                format!("`credits` must be 1 to {MAX_VOUCHER_CREDITS}."),
            ));
        }
        let created_at = self.now();
        if request.expires_at.is_some_and(|at| at <= created_at) {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "expires_at",
                "`expires_at` must be in the future.",
            ));
        }
        // The bound applies to what was sent, as the published schema says, not to its trim.
        if request
            .note
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_NOTE_CHARS)
        {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "note",
                format!("`note` must be at most {MAX_NOTE_CHARS} characters."),
            ));
        }
        if let Some(note) = &request.note {
            super::service::refuse_nul("note", note)?;
        }
        let note = request
            .note
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        let code = secrets::new_voucher_code()?;
        let record = VoucherRecord {
            id: secrets::new_id("vch")?,
            code_hash: secrets::hash_secret(&code),
            prefix: voucher_prefix(&code),
            credits: request.credits,
            note,
            created_at,
            expires_at: request.expires_at.map(|at| from_millis(to_millis(at))),
            redeemed_at: None,
            redeemed_by: None,
        };
        self.disk.ensure_headroom()?;
        self.store.create_voucher(&record).await?;
        Ok(CreatedVoucher {
            voucher: voucher_view(record),
            code,
        })
    }

    /// Redeems `code` for the account: its credits are added at once, with a ledger entry.
    pub async fn redeem_voucher(&self, account_id: &str, code: &str) -> Result<Redeemed> {
        let code = normalize_code(code);
        if code.is_empty() {
            return Err(Error::invalid(
                ErrorCode::InvalidValue,
                "code",
                "`code` is empty: send the voucher code, `tgv_…`.",
            ));
        }
        if !code.starts_with(secrets::VOUCHER_CODE_PREFIX) || code.chars().count() > MAX_CODE_CHARS
        {
            return Err(Error::VoucherRefused(VoucherRefusal::Unknown));
        }
        self.disk.ensure_headroom()?;
        match self
            .store
            .redeem_voucher(&secrets::hash_secret(&code), account_id, self.now())
            .await?
        {
            RedeemOutcome::Redeemed { account, voucher } => {
                tracing::info!(voucher_id = %voucher.id, account_id, credits = voucher.credits, "voucher redeemed");
                Ok(Redeemed {
                    account: self.account_view(&account),
                    credits: voucher.credits,
                })
            }
            RedeemOutcome::Unknown => Err(Error::VoucherRefused(VoucherRefusal::Unknown)),
            RedeemOutcome::AlreadyRedeemed => {
                Err(Error::VoucherRefused(VoucherRefusal::AlreadyRedeemed))
            }
            RedeemOutcome::Expired => Err(Error::VoucherRefused(VoucherRefusal::Expired)),
            RedeemOutcome::NoAccount => Err(Error::NotFound {
                what: "account",
                id: account_id.chars().take(64).collect(),
            }),
        }
    }

    /// Operator: the most recent vouchers (up to `limit`), newest first, without their codes.
    pub async fn list_vouchers(&self, limit: u32) -> Result<List<Voucher>> {
        let limit = limit.clamp(1, 500);
        let mut records = self.store.list_vouchers(limit + 1).await?;
        let has_more = records.len() > limit as usize;
        records.truncate(limit as usize);
        Ok(List {
            object: "list".to_owned(),
            data: records.into_iter().map(voucher_view).collect(),
            has_more,
        })
    }
}

/// The first characters of a code, safe to show in lists.
fn voucher_prefix(code: &str) -> String {
    code.chars()
        .take(secrets::VOUCHER_CODE_PREFIX.len() + 6)
        .collect()
}

fn voucher_view(record: VoucherRecord) -> Voucher {
    Voucher {
        id: record.id,
        object: "voucher".to_owned(),
        prefix: record.prefix,
        credits: record.credits,
        note: record.note,
        created_at: record.created_at,
        expires_at: record.expires_at,
        redeemed_at: record.redeemed_at,
        redeemed_by: record.redeemed_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_read_forgivingly() {
        assert_eq!(normalize_code("  TGV_ABC123 \n"), "tgv_abc123");
        let code = secrets::new_voucher_code().unwrap();
        assert!(code.starts_with("tgv_"));
        assert_eq!(code.len(), 4 + 32);
        assert_eq!(voucher_prefix(&code).len(), 10);
    }
}

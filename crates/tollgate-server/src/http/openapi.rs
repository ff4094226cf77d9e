//! The OpenAPI 3.1 document, generated from the handlers' annotations (utoipa).

use super::routes;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "tollgate", description = "Paid, asynchronous image generation. Every error is `{\"error\": {\"message\", \"type\", \"code\"}}`."),
    paths(
        routes::create_generation, routes::get_task, routes::list_tasks, routes::cancel_task, routes::task_image, routes::linked_image,
        routes::account, routes::models, routes::create_account, routes::list_accounts, routes::get_account, routes::update_account,
        routes::create_key, routes::list_keys, routes::revoke_key, routes::add_credits, routes::account_ledger,
        routes::admin_ledger, routes::create_voucher, routes::list_vouchers, routes::redeem_voucher,
        routes::webhook_secret, routes::rotate_webhook_secret,
        routes::healthz, routes::readyz, routes::metrics, routes::openapi,
    ),
    modifiers(&Security),
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["api_key", "admin_token"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The document served at `/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

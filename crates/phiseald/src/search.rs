//! The searchable-field RPCs: `EncryptDeterministic`, `BlindIndex`, `SearchTerms`
//! (`docs/SEARCH.md`). Same shape as the unary field RPCs: admit, parse, authorize, run on
//! the keyring, reply; plaintexts and looked-up values are wiped on every path.

use phiseal::audit::Action;
use phiseal::{BlindIndexSpec, Normalization};
use phiseal_proto::v1 as pb;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::policy::Operation;
use crate::service::{Sidecar, key_version_of, parse_context};
use crate::status;

fn term(t: phiseal::SearchTerm) -> pb::SearchTerm {
    pb::SearchTerm {
        key_version: t.key_version,
        value: t.value,
    }
}

/// The blind-index spec of a request; INVALID_ARGUMENT names what is wrong.
fn spec(spec: Option<&pb::BlindIndexSpec>) -> Result<BlindIndexSpec, Status> {
    let spec = spec.ok_or_else(|| {
        status::from_error(&phiseal::Error::InvalidInput {
            what: "spec",
            reason: "missing: give a normalization and a number of bits",
        })
    })?;
    let normalization = match pb::Normalization::try_from(spec.normalization) {
        Ok(pb::Normalization::Exact) => Normalization::Exact,
        Ok(pb::Normalization::CaseFolded) => Normalization::CaseFolded,
        Ok(pb::Normalization::DigitsOnly) => Normalization::DigitsOnly,
        Ok(pb::Normalization::Unspecified) | Err(_) => {
            return Err(status::from_error(&phiseal::Error::InvalidInput {
                what: "spec.normalization",
                reason: "must be EXACT, CASE_FOLDED or DIGITS_ONLY",
            }));
        }
    };
    BlindIndexSpec::new(normalization, spec.bits).map_err(|e| status::from_error(&e))
}

impl Sidecar {
    /// `EncryptDeterministic`.
    pub(crate) async fn encrypt_deterministic(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let mut request = request;
        let plaintext = Zeroizing::new(std::mem::take(&mut request.get_mut().plaintext));
        let call = self
            .admit("EncryptDeterministic", Operation::Encrypt, &request)
            .await?;
        let result = self
            .within(&call, async {
                let body = request.into_inner();
                let context =
                    parse_context(body.context.as_ref()).map_err(|e| status::from_error(&e))?;
                self.authorize_field_as(
                    &call,
                    Operation::Encrypt,
                    Action::EncryptDeterministic,
                    &context,
                )
                .await?;
                let ciphertext = self
                    .inline(
                        self.keyring
                            .encrypt_deterministic(&call.caller, &context, &plaintext),
                    )
                    .await?
                    .map_err(|e| status::from_error(&e))?;
                Ok(pb::EncryptResponse {
                    key_version: key_version_of(&ciphertext),
                    ciphertext,
                })
            })
            .await;
        self.reply(&call, result)
    }

    /// `BlindIndex`.
    pub(crate) async fn blind_index(
        &self,
        request: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        let mut request = request;
        let value = Zeroizing::new(std::mem::take(&mut request.get_mut().value));
        let call = self
            .admit("BlindIndex", Operation::Search, &request)
            .await?;
        let result = self
            .within(&call, async {
                let body = request.into_inner();
                let context =
                    parse_context(body.context.as_ref()).map_err(|e| status::from_error(&e))?;
                let spec = spec(body.spec.as_ref())?;
                self.authorize_field_as(&call, Operation::Search, Action::BlindIndex, &context)
                    .await?;
                let index = self
                    .inline(
                        self.keyring
                            .blind_index(&call.caller, &context, &value, &spec),
                    )
                    .await?
                    .map_err(|e| status::from_error(&e))?;
                Ok(pb::BlindIndexResponse {
                    term: Some(term(index)),
                })
            })
            .await;
        self.reply(&call, result)
    }

    /// `SearchTerms`.
    pub(crate) async fn search_terms(
        &self,
        request: Request<pb::SearchTermsRequest>,
    ) -> Result<Response<pb::SearchTermsResponse>, Status> {
        let mut request = request;
        let value = Zeroizing::new(std::mem::take(&mut request.get_mut().value));
        let call = self
            .admit("SearchTerms", Operation::Search, &request)
            .await?;
        let result = self
            .within(&call, async {
                let body = request.into_inner();
                let context =
                    parse_context(body.context.as_ref()).map_err(|e| status::from_error(&e))?;
                let terms = match &body.kind {
                    Some(pb::search_terms_request::Kind::Deterministic(_)) => {
                        self.authorize_field_as(
                            &call,
                            Operation::Search,
                            Action::DeterministicQuery,
                            &context,
                        )
                        .await?;
                        self.inline(self.keyring.deterministic_query(
                            &call.caller,
                            &context,
                            &value,
                        ))
                        .await?
                    }
                    Some(pb::search_terms_request::Kind::BlindIndex(s)) => {
                        let spec = spec(Some(s))?;
                        self.authorize_field_as(
                            &call,
                            Operation::Search,
                            Action::BlindIndexQuery,
                            &context,
                        )
                        .await?;
                        self.inline(self.keyring.blind_index_query(
                            &call.caller,
                            &context,
                            &value,
                            &spec,
                        ))
                        .await?
                    }
                    None => {
                        return Err(status::from_error(&phiseal::Error::InvalidInput {
                            what: "kind",
                            reason: "missing: deterministic or blind_index",
                        }));
                    }
                }
                .map_err(|e| status::from_error(&e))?;
                Ok(pb::SearchTermsResponse {
                    terms: terms.into_iter().map(term).collect(),
                })
            })
            .await;
        self.reply(&call, result)
    }
}

//! Expansion of `#[cluster::message]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::Item;
use syn::visit_mut::VisitMut;

use crate::errors::{Failure, Invalid};
use crate::paths::Krate;
use crate::validate::{Message, MessageRecovery};

/// The errors, then what the type still expands to.
pub fn recover(invalid: Invalid<MessageRecovery>) -> Failure {
    let tokens = match invalid.recovery {
        MessageRecovery::Defaults(message) => expand(&message),
        MessageRecovery::Derives(message) => {
            let derives = derives(&Krate(message.krate.clone()));
            let item = &message.item;
            quote!(#derives #item)
        }
        MessageRecovery::Verbatim(item) => quote!(#item),
    };
    Failure {
        error: invalid.error,
        tokens,
    }
}

// Input:  #[cluster::message] enum ToPrimary { Ping(u32) }
// Output: #[derive(Serialize, Deserialize)] #[serde(crate = "::cluster::__private::serde")]
//         enum ToPrimary { Ping(u32) }
//         impl ::cluster::__private::Message for ToPrimary { const FINGERPRINT: u64 = 0x..; }
pub fn expand(message: &Message) -> TokenStream {
    let krate = Krate(message.krate.clone());
    let (ident, item) = (&message.ident, &message.item);
    let fingerprint = fingerprint(item);
    let derives = derives(&krate);
    let trait_path = krate.message_trait(ident.span());
    let impl_block = quote_spanned! {ident.span()=>
        impl #trait_path for #ident {
            const FINGERPRINT: ::core::primitive::u64 = #fingerprint;
        }
    };
    quote! {
        #derives
        #item
        #impl_block
    }
}

// Input:  enum ToPrimary { .. }
// Output: #[derive(Serialize, Deserialize)] #[serde(crate = "::cluster::__private::serde")]
fn derives(krate: &Krate) -> TokenStream {
    let serde = krate.serde();
    let serde_str = krate.serde_string();
    quote! {
        #[derive(#serde::Serialize, #serde::Deserialize)]
        #[serde(crate = #serde_str)]
    }
}

/// FNV-1a of the definition without its doc comments: editing docs keeps workers compatible,
/// changing a field or variant does not.
fn fingerprint(item: &Item) -> u64 {
    struct StripDocs;
    impl VisitMut for StripDocs {
        fn visit_attributes_mut(&mut self, attrs: &mut Vec<syn::Attribute>) {
            attrs.retain(|a| !a.path().is_ident("doc"));
        }
    }
    let mut item = item.clone();
    StripDocs.visit_item_mut(&mut item);
    let text = quote!(#item).to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

//! Expansion of `#[cluster::message]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::visit_mut::VisitMut;
use syn::{Error, Item};

use crate::args;
use crate::paths::Krate;

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    match try_expand(args, item.clone()) {
        Ok(ts) => ts,
        Err(e) => {
            let e = e.to_compile_error();
            quote!(#e #item)
        }
    }
}

// Input:  #[cluster::message] enum ToPrimary { Ping(u32) }
// Output: #[derive(Serialize, Deserialize)] #[serde(crate = "::cluster::__private::serde")]
//         enum ToPrimary { Ping(u32) }
//         impl ::cluster::__private::Message for ToPrimary { const FINGERPRINT: u64 = 0x..; }
fn try_expand(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let krate = Krate(args::parse_message(args)?);
    let item: Item = syn::parse2(item)?;
    let (ident, generics) = match &item {
        Item::Enum(e) => (&e.ident, &e.generics),
        Item::Struct(s) => (&s.ident, &s.generics),
        other => {
            return Err(Error::new_spanned(
                other,
                "`#[cluster::message]` goes on an `enum` or a `struct`",
            ));
        }
    };
    if !generics.params.is_empty() {
        return Err(Error::new_spanned(
            generics,
            "a cluster message cannot be generic; define a concrete type for each message",
        ));
    }
    let fingerprint = fingerprint(&item);
    let serde = krate.serde();
    let serde_str = krate.serde_string();
    let trait_path = krate.message_trait(ident.span());
    let impl_block = quote_spanned! {ident.span()=>
        impl #trait_path for #ident {
            const FINGERPRINT: u64 = #fingerprint;
        }
    };
    Ok(quote! {
        #[derive(#serde::Serialize, #serde::Deserialize)]
        #[serde(crate = #serde_str)]
        #item
        #impl_block
    })
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

/* What _transport_aead exports to other C extensions (device/_lane.c), through the capsule
 * TRANSPORT_AEAD_CAPSULE: a TransportKey's OpenSSL context, so that no other module knows
 * the key object's layout. A change here renames the capsule, so that a module built against
 * an older header fails to import instead of calling the wrong function. */
#ifndef WGVSOCK_TRANSPORT_AEAD_API_H
#define WGVSOCK_TRANSPORT_AEAD_API_H

#include <Python.h>
#include <openssl/evp.h>

/* The module's attribute holding the capsule, and the capsule's name (its full path). */
#define TRANSPORT_AEAD_CAPSULE_ATTR "_C_API_1"
#define TRANSPORT_AEAD_CAPSULE "wgvsock.core._transport_aead." TRANSPORT_AEAD_CAPSULE_ATTR

typedef struct {
    /* The key's sealing (seal != 0) or opening context, or NULL with a TypeError set when
     * `key` is not a TransportKey. Borrowed: valid while the key lives; a caller that
     * releases the GIL works on an EVP_CIPHER_CTX_copy of it. */
    EVP_CIPHER_CTX *(*context)(PyObject *key, int seal);
} TransportAeadAPI;

#endif

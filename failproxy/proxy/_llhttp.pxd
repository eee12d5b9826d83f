# The C parts of _llhttp.pyx that the C core (_core.pyx) uses too: llhttp's API, the header-name
# table and the recent-strings cache.

from libc.stdint cimport uint8_t, uint16_t, uint64_t

cdef extern from "llhttp.h":
    ctypedef struct llhttp_t:
        void* data
        uint64_t content_length
        uint16_t flags
        uint8_t method
        uint8_t http_major
        uint8_t http_minor
        uint8_t upgrade
        uint16_t status_code
    ctypedef int (*llhttp_data_cb)(llhttp_t*, const char* at, size_t length) noexcept
    ctypedef int (*llhttp_cb)(llhttp_t*) noexcept
    ctypedef struct llhttp_settings_t:
        llhttp_cb on_message_begin
        llhttp_data_cb on_url
        llhttp_data_cb on_status
        llhttp_data_cb on_header_field
        llhttp_data_cb on_header_value
        llhttp_cb on_headers_complete
        llhttp_data_cb on_body
        llhttp_cb on_message_complete
        llhttp_cb on_header_field_complete
        llhttp_cb on_header_value_complete
    ctypedef enum llhttp_type_t:
        HTTP_REQUEST
        HTTP_RESPONSE
    ctypedef enum llhttp_errno_t:
        HPE_OK
        HPE_INVALID_STATUS
        HPE_INVALID_METHOD
        HPE_INVALID_URL
        HPE_CB_MESSAGE_BEGIN
        HPE_CB_HEADERS_COMPLETE
        HPE_CB_MESSAGE_COMPLETE
        HPE_CB_CHUNK_HEADER
        HPE_CB_CHUNK_COMPLETE
        HPE_PAUSED_UPGRADE
        HPE_PAUSED
        HPE_USER
    ctypedef enum llhttp_flags:
        F_CONTENT_LENGTH
        F_CHUNKED
        F_TRANSFER_ENCODING
    ctypedef enum llhttp_method_t:
        HTTP_GET
        HTTP_HEAD
    void llhttp_settings_init(llhttp_settings_t* settings)
    void llhttp_init(llhttp_t* parser, llhttp_type_t type, const llhttp_settings_t* settings)
    llhttp_errno_t llhttp_execute(llhttp_t* parser, const char* data, size_t len)
    int llhttp_should_keep_alive(const llhttp_t* parser)
    const char* llhttp_get_error_reason(const llhttp_t* parser)
    void llhttp_set_error_reason(llhttp_t* parser, const char* reason)
    const char* llhttp_get_error_pos(const llhttp_t* parser)
    void llhttp_resume_after_upgrade(llhttp_t* parser)
    const char* llhttp_method_name(uint8_t method)



cdef class Names:
    cdef bytes _store
    cdef size_t* _offsets
    cdef int* _kinds
    cdef int* _first
    cdef size_t _longest
    cdef bint _underscore

    cdef int _lookup(self, const char* p, size_t n) noexcept


cdef bytes _recent(const char* p, size_t n)

// Symbol visibility of libmqa_client. The library is built with hidden visibility so that the gRPC and
// protobuf code embedded in it stays private; only what is marked MQA_CLIENT_EXPORT is visible to callers.
#ifndef MQA_CLIENT_EXPORT_H_
#define MQA_CLIENT_EXPORT_H_

#if defined(_WIN32)
#define MQA_CLIENT_EXPORT
#else
#define MQA_CLIENT_EXPORT __attribute__((visibility("default")))
#endif

#endif  // MQA_CLIENT_EXPORT_H_
